"""The live statistics graph: reference.onnx in eval mode, whose only outputs are, for every
BatchNormalization, the per-channel mean and biased variance of its input over one batch
(two-pass, in the model's float type) and the input's shape.

Nothing after the last BatchNormalization is an output, so ONNX Runtime drops the head; the
per-batch moments are merged across batches in float64 by service.drift.live (Chan's formula).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from .graph import DriftGraphError, TappedLayer, _Builder, _epsilon, _static_shapes, copy_for_taps


@dataclass
class StatisticsGraph:
    model: onnx.ModelProto
    layers: list[TappedLayer]


def build_statistics_graph(
    reference: onnx.ModelProto, layer_names: dict[str, str]
) -> StatisticsGraph:
    """layer_names maps BatchNormalization node names to the names users know them by."""
    model, opset = copy_for_taps(reference, "live drift")
    graph = model.graph
    shapes = _static_shapes(model)
    builder = _Builder(graph, opset)
    layers: list[TappedLayer] = []
    for node in list(graph.node):
        if node.op_type != "BatchNormalization":
            continue
        x = node.input[0]
        shape = shapes.get(x)
        if shape is None or len(shape) < 2 or shape[1] is None:
            raise DriftGraphError(
                f"the input of BatchNormalization '{node.name}' has no known rank"
            )
        layer = TappedLayer(
            name=layer_names.get(node.name, node.name or x),
            node=node.name or x,
            channels=int(shape[1]),
            epsilon=_epsilon(node),
            rank=len(shape),
            spatial=None,
        )
        layers.append(layer)
        mean, var = builder.moments(x, [0, *range(2, layer.rank)], layer.channels)
        builder.output(mean, layer.tap("mean"))
        builder.output(var, layer.tap("var"))
        builder.output(builder.node("Shape", [x]), layer.tap("shape"))
        builder.output(builder.node("Identity", [node.input[3]]), layer.tap("running_mean"))
        builder.output(builder.node("Identity", [node.input[4]]), layer.tap("running_var"))
    del graph.value_info[:]
    del graph.output[:]
    graph.output.extend(builder.outputs)
    return StatisticsGraph(model=model, layers=layers)
