"""Exact BatchNorm folding at the ONNX level, for graphs from any producer.

`fold_batch_norms` removes every eval-mode BatchNormalization node:
  1. into the Conv that produces its input (conv_bn),
  2. into a ConvTranspose (conv_transpose_bn),
  3. into a Gemm or a rank-2 MatMul(+Add) (linear_bn),
  4. forward into the Conv/Gemm/MatMul that alone reads it, where exact (forward_bn),
     else as one per-channel Mul+Add (affine_bn);
then 5. folds per-channel Mul/Add constants after convolutions into them (conv_affine).
Folded weights are new initializers (6) computed in float64 (7); BN nodes that normalize with
batch statistics stop the fold with a clear error (8).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import onnx

from ..errors import BatchStatisticsError, UnsupportedGraphError
from .affine_bn import rewrite_as_affine
from .batchnorm import BatchNorm, read_batch_norm
from .constants import materialize_parameters
from .conv_affine import AffineFold, fold_conv_affines
from .conv_bn import scale_conv_output
from .conv_transpose_bn import scale_conv_transpose_output
from .forward_bn import fold_forward
from .graph import Graph
from .linear_bn import scale_gemm_output, scale_matmul_output
from .naming import layer_name, unique_names

__all__ = [
    "FoldResult",
    "FoldedLayer",
    "find_batch_norms",
    "fold_batch_norms",
    "materialize_constants",
]


def materialize_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose computed weights and biases are initializers (see constants)."""
    graph = Graph(copy.deepcopy(model))
    materialize_parameters(graph)
    return graph.model


@dataclass
class FoldedLayer:
    layer: str
    onnx_node: str
    channels: int
    epsilon: float
    momentum: float
    method: str  # folded_into_conv | ... | rewritten_as_affine
    target: str | None  # the node that absorbed it
    reason: str | None = None  # why a weaker method was used


@dataclass
class FoldResult:
    model: onnx.ModelProto
    layers: list[FoldedLayer] = field(default_factory=list)
    affine_folds: list[AffineFold] = field(default_factory=list)


def find_batch_norms(graph: Graph) -> list[BatchNorm]:
    """Every BatchNormalization of the main graph in graph order, read as eval-mode affines."""
    for node in graph.graph.node:
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            if any(n.op_type == "BatchNormalization" for g in subgraphs for n in g.node):
                raise UnsupportedGraphError(
                    f"BatchNormalization inside the subgraph of {node.op_type} '{node.name}': "
                    "expected BatchNorm layers in the main graph only"
                )
    nodes = list(graph.nodes("BatchNormalization"))
    names = unique_names([layer_name(n) for n in nodes])
    found, batch_stat = [], []
    for node, name in zip(nodes, names, strict=True):
        bn = read_batch_norm(graph, node, name)
        if isinstance(bn, str):
            batch_stat.append((name, bn))
        else:
            found.append(bn)
    if batch_stat:
        listing = "; ".join(f"{name}: {why}" for name, why in batch_stat)
        raise BatchStatisticsError(
            f"{len(batch_stat)} BatchNorm layer(s) cannot be folded as eval-mode layers "
            f"({listing}); "
            "expected BatchNormalization with stored running statistics (training_mode=0)",
            [name for name, _ in batch_stat],
        )
    return found


def fold_batch_norms(model: onnx.ModelProto) -> FoldResult:
    """A copy of `model` with every BatchNormalization folded away, and what was done to each."""
    graph = Graph(copy.deepcopy(model))
    result = FoldResult(model=graph.model)
    materialize_parameters(graph)
    batch_norms = find_batch_norms(graph)
    _materialize_parameters(graph, batch_norms)
    for bn in batch_norms:
        result.layers.append(_fold_one(graph, bn))
        graph.reindex()
    result.affine_folds = fold_conv_affines(graph)
    graph.prune()
    left = [n.name for n in graph.nodes("BatchNormalization")]
    if left:  # defensive: every branch above removes its node
        raise UnsupportedGraphError(f"BatchNormalization nodes left after folding: {left}")
    return result


def _materialize_parameters(graph: Graph, batch_norms: list[BatchNorm]) -> None:
    """Point each BN at its resolved parameters, so the nodes that computed them (Shape/Expand
    for affine=False, CastLike, ...) become dead and stop counting as readers of activations."""
    for bn in batch_norms:
        for index, value in enumerate((bn.scale, bn.bias, bn.mean, bn.var), start=1):
            graph.set_input(bn.node, index, value.astype(bn.dtype))
    graph.prune()


def _fold_one(graph: Graph, bn: BatchNorm) -> FoldedLayer:
    a, b = bn.affine()
    producer = graph.producer.get(bn.x)
    record = FoldedLayer(
        layer=bn.layer,
        onnx_node=bn.node.name,
        channels=bn.channels,
        epsilon=bn.epsilon,
        momentum=bn.momentum,
        method="",
        target=None,
    )
    reason = _why_not_backward(graph, bn, producer)
    if reason is None:
        tail = _fold_backward(graph, producer, a, b)
        if tail is not None:
            for reader in _shape_readers(graph, bn.x):
                reader.input[0] = bn.y  # same shape, and tail now produces it
            tail.output[0] = bn.y
            graph.remove(bn.node)
            record.method = f"folded_into_{_snake(producer.op_type)}"
            record.target = producer.name
            return record
        reason = f"{producer.op_type} '{producer.name}' has no constant weight of a foldable shape"
    reader = fold_forward(graph, bn)
    if reader is not None:
        record.method = f"folded_forward_into_{_snake(reader.op_type)}"
        record.target = reader.name
        record.reason = reason
        return record
    if not rewrite_as_affine(graph, bn):
        raise UnsupportedGraphError(
            f"BatchNorm layer '{bn.layer}': the rank of its input '{bn.x}' is unknown, so it can "
            "be neither folded nor rewritten; expected an input with a known rank"
        )
    record.method = "rewritten_as_affine"
    record.reason = reason
    return record


def _why_not_backward(graph: Graph, bn: BatchNorm, producer: onnx.NodeProto | None) -> str | None:
    if producer is None:
        kind = "a graph input" if bn.x in graph.graph_inputs else "not produced by a node"
        return f"its input '{bn.x}' is {kind}"
    if producer.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add"):
        return f"its producer is {producer.op_type} '{producer.name}'"
    if bn.x in graph.graph_outputs:
        return f"its input '{bn.x}' is also a graph output"
    readers = {id(n) for n in graph.consumers[bn.x]} - {id(n) for n in _shape_readers(graph, bn.x)}
    if readers != {id(bn.node)}:
        return f"{producer.op_type} '{producer.name}' has other consumers"
    if len([o for o in producer.output if o]) != 1:
        return f"{producer.op_type} '{producer.name}' has several outputs"
    return None


def _shape_readers(graph: Graph, name: str) -> list[onnx.NodeProto]:
    """Readers that use only the shape of `name`, which folding does not change."""
    readers = graph.consumers[name]
    return [n for n in readers if n.op_type in ("Shape", "Size") and n.input[0] == name]


def _fold_backward(graph: Graph, producer: onnx.NodeProto, a, b) -> onnx.NodeProto | None:
    """The node whose output now carries a * x + b, or None if the producer cannot take it."""
    if producer.op_type == "Conv":
        return producer if scale_conv_output(graph, producer, a, b) else None
    if producer.op_type == "ConvTranspose":
        return producer if scale_conv_transpose_output(graph, producer, a, b) else None
    if producer.op_type == "Gemm":
        return producer if scale_gemm_output(graph, producer, a, b) else None
    return scale_matmul_output(graph, producer, a, b)  # MatMul, or Add after a MatMul


def _snake(op_type: str) -> str:
    return {"ConvTranspose": "conv_transpose", "MatMul": "matmul", "Add": "matmul"}.get(
        op_type, op_type.lower()
    )
