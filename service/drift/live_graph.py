"""The live statistics graph: reference.onnx in eval mode, whose only outputs are, for every
BatchNormalization, the per-channel mean and biased variance of its input over one batch
(two-pass, in the model's float type) and the input's shape.

Nothing after the last BatchNormalization is an output, so ONNX Runtime drops the head; the
per-batch moments are merged across batches in float64 by service.drift.live (Chan's formula).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from .graph import TappedLayer, _Builder, _static_shapes, copy_for_taps, tap_input_moments


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
        layers.append(tap_input_moments(builder, node, shapes, layer_names, ""))
    del graph.value_info[:]
    del graph.output[:]
    graph.output.extend(builder.outputs)
    return StatisticsGraph(model=model, layers=layers)
