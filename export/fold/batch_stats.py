"""Rule 8: a BatchNormalization that normalizes with batch statistics is never treated as eval.

Such a node makes every sample's output depend on the rest of the batch. It appears as
training_mode=1 (opset 14+), is_test=0 (opset < 7), extra running-statistics outputs that
something reads, or mean/variance inputs computed from the data, which is what torch.onnx emits
(ReduceMean over the batch and spatial axes) for layers with track_running_stats=False.
"""

from __future__ import annotations

import onnx

from .graph import Graph, attribute


def batch_statistics_reason(graph: Graph, node: onnx.NodeProto) -> str | None:
    """Why this BN computes batch statistics, or None when it uses stored statistics."""
    if attribute(node, "training_mode", 0) == 1:
        return "it computes batch statistics (training_mode=1)"
    if graph.opset < 7 and attribute(node, "is_test", 0) == 0:
        return "it computes batch statistics (is_test=0)"
    if any(name and graph.uses(name) for name in node.output[1:]):
        return "it outputs updated running statistics that the graph reads"
    for name, role in zip(node.input[3:5], ("mean", "variance"), strict=False):
        if graph.constant(name) is None:
            source = graph.producer.get(name)
            how = f"computed by {source.op_type} '{source.name}'" if source else "a graph input"
            return (
                f"its {role} is {how}, not a stored statistic: it normalizes with batch "
                "statistics (as exported for track_running_stats=False)"
            )
    return None
