"""The stat-drift graph, rewritten from reference.onnx without torch.

One ONNX graph computes, from one input batch, in one session.run:
  * the global-statistics path: reference.onnx as exported, eval-mode BatchNormalization with the
    stored running statistics (what the service serves);
  * the batch-statistics path: a copy of the graph in which every BatchNormalization normalizes
    with the batch's own mean and biased variance over every axis but the channel axis, which
    is PyTorch's train-mode forward (updating nothing). The statistics come from ReduceMean and
    ReduceSumSquare and feed an eval-mode BatchNormalization, not BatchNormalization with
    training_mode=1, which the CUDA execution provider rejects;
  * taps: each BN layer's per-channel input mean and variance on both paths, the input's shape,
    and the stored running mean and variance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

BATCH = "bnserve.batch::"
TAP = "bnserve.tap::"


class DriftGraphError(Exception):
    """The reference graph cannot be analysed; the message says why."""


@dataclass
class TappedLayer:
    name: str  # PyTorch module path from model.json, else the node name
    node: str
    channels: int
    epsilon: float
    rank: int
    spatial: int | None  # positions per sample per channel, when the shape is static

    def tap(self, what: str) -> str:
        return f"{TAP}{self.node}/{what}"


@dataclass
class DriftGraph:
    model: onnx.ModelProto
    layers: list[TappedLayer]
    outputs: list[str]  # the model's outputs, global path

    @staticmethod
    def batch_name(output: str) -> str:
        return f"{TAP}batch_output/{output}"


def copy_for_taps(reference: onnx.ModelProto, feature: str) -> tuple[onnx.ModelProto, int]:
    """A copy of reference.onnx to add taps to, and its opset; refuses what taps cannot handle."""
    model = onnx.ModelProto.FromString(reference.SerializeToString())
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise DriftGraphError(f"opset {opset} is too old for {feature}; expected >= 13")
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in model.graph.node
        for a in n.attribute
    ):
        raise DriftGraphError(f"control flow (If/Loop/Scan) is not supported by {feature}")
    return model, opset


def tap_input_moments(
    builder: _Builder, node: onnx.NodeProto, shapes: dict, layer_names: dict[str, str], prefix: str
) -> TappedLayer:
    """The BN layer of `node`, with outputs tapping its input's per-channel mean and biased var
    (`<prefix>mean`, `<prefix>var`), the input's shape and the stored running statistics."""
    x = node.input[0]
    shape = shapes.get(x)
    if shape is None or len(shape) < 2 or shape[1] is None:
        raise DriftGraphError(f"the input of BatchNormalization '{node.name}' has no known rank")
    spatial = None if any(d is None for d in shape[2:]) else int(np.prod(shape[2:], dtype=np.int64))
    layer = TappedLayer(
        name=layer_names.get(node.name, node.name or x),
        node=node.name or x,
        channels=int(shape[1]),
        epsilon=_epsilon(node),
        rank=len(shape),
        spatial=spatial,
    )
    mean, var = builder.moments(x, [0, *range(2, layer.rank)], layer.channels)
    builder.output(mean, layer.tap(f"{prefix}mean"))
    builder.output(var, layer.tap(f"{prefix}var"))
    builder.output(builder.node("Shape", [x]), layer.tap("shape"))
    builder.output(builder.node("Identity", [node.input[3]]), layer.tap("running_mean"))
    builder.output(builder.node("Identity", [node.input[4]]), layer.tap("running_var"))
    return layer


def build_drift_graph(reference: onnx.ModelProto, layer_names: dict[str, str]) -> DriftGraph:
    """layer_names maps BatchNormalization node names to the names users know them by."""
    model, opset = copy_for_taps(reference, "stat-drift")
    graph = model.graph
    shapes = _static_shapes(model)
    builder = _Builder(graph, opset)
    keep = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    original = list(graph.node)
    layers: list[TappedLayer] = []
    for node in original:
        if node.op_type != "BatchNormalization":
            continue
        if any(a.name == "training_mode" and a.i == 1 for a in node.attribute):
            raise DriftGraphError(f"BatchNormalization '{node.name}' is in training mode")
        layers.append(tap_input_moments(builder, node, shapes, layer_names, "global_"))

    def batch(name: str) -> str:
        return name if name in keep else f"{BATCH}{name}"

    by_node = {layer.node: layer for layer in layers}
    for node in original:
        inputs = [batch(i) for i in node.input]
        if node.op_type != "BatchNormalization":
            copy = helper.make_node(
                node.op_type, inputs, [batch(o) for o in node.output], domain=node.domain
            )
            copy.attribute.extend(node.attribute)
            builder.add(copy)
            continue
        layer = by_node[node.name or node.input[0]]
        axes = [0, *range(2, layer.rank)]
        mean, var = builder.moments(inputs[0], axes, layer.channels)
        # Eval-mode BatchNormalization fed the batch's own statistics is exactly train mode's
        # normalization, in one fused pass, and every execution provider runs it.
        normalize = helper.make_node(
            "BatchNormalization",
            [*inputs[:3], mean, var],
            [batch(node.output[0])],
            epsilon=layer.epsilon,
        )
        builder.add(normalize)
        builder.output(mean, layer.tap("batch_mean"))
        builder.output(var, layer.tap("batch_var"))

    outputs = [o.name for o in graph.output]
    for name in outputs:
        builder.output(builder.node("Identity", [batch(name)]), DriftGraph.batch_name(name))
    del graph.value_info[:]
    graph.output.extend(builder.outputs)
    return DriftGraph(model=model, layers=layers, outputs=outputs)


class _Builder:
    """Appends nodes (after the originals, so the node list stays topologically sorted)."""

    def __init__(self, graph: onnx.GraphProto, opset: int) -> None:
        self.graph, self.opset = graph, opset
        self.count = 0
        self.outputs: list[onnx.ValueInfoProto] = []

    def fresh(self) -> str:
        self.count += 1
        return f"{TAP}t{self.count}"

    def add(self, node: onnx.NodeProto) -> None:
        self.graph.node.append(node)

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.fresh()
        self.add(helper.make_node(op, inputs, [out], **attrs))
        return out

    def constant(self, value: np.ndarray, like: str | None = None) -> str:
        name = self.fresh()
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        return self.node("CastLike", [name, like]) if like is not None else name

    def reduce(self, op: str, x: str, axes: list[int]) -> str:
        if self.opset >= 18:
            return self.node(op, [x, self.constant(np.array(axes, np.int64))], keepdims=1)
        return self.node(op, [x], axes=axes, keepdims=1)

    def moments(self, x: str, axes: list[int], channels: int) -> tuple[str, str]:
        """Per-channel mean and biased variance, flat (C,), two-pass for precision.

        ReduceSumSquare of the centered input costs one pass and no squared copy; this and one
        ReduceMean are all the analysis adds per layer and path, which keeps a stat-drift call
        near two forward passes.
        """
        mean = self.reduce("ReduceMean", x, axes)
        sum_squares = self.reduce("ReduceSumSquare", self.node("Sub", [x, mean]), axes)
        per_channel = self.node("Div", [self.node("Size", [x]), self.constant(np.array(channels))])
        var = self.node("Div", [sum_squares, self.node("CastLike", [per_channel, x])])
        return self.flatten(mean), self.flatten(var)

    def flatten(self, x: str) -> str:
        return self.node("Reshape", [x, self.constant(np.array([-1], np.int64))])

    def output(self, source: str, name: str) -> None:
        self.add(helper.make_node("Identity", [source], [name]))
        self.outputs.append(helper.make_empty_tensor_value_info(name))


def _epsilon(node: onnx.NodeProto) -> float:
    for a in node.attribute:
        if a.name == "epsilon":
            return float(a.f)
    return 1e-5


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:
        raise DriftGraphError(f"shape inference failed on reference.onnx: {exc}") from None
    shapes = {}
    g = inferred.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [
                d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim
            ]
    return shapes
