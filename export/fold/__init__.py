"""Exact BatchNorm folding at the ONNX level, for graphs from any producer.

`fold_batch_norms` removes every eval-mode BatchNormalization node by the first rule of the
table in `rules` that takes it:
  1. into the Conv that produces its input (conv_bn),
  2. into a ConvTranspose (conv_transpose_bn),
  3. into a Gemm or a rank-2 MatMul(+Add) (linear_bn),
  9. into each Conv of a channel Concat of convolutions, slice by slice (concat_conv_bn),
  4b. forward into the Conv/Gemm/MatMul that alone reads it, where exact (forward_bn),
  10. on the identity branch of a RepVGG-style block, merged with the branch convs into one
     Conv (reparam_branches),
else 4a. as one per-channel Mul+Add (affine_bn); then 5. folds per-channel Mul/Add constants
after convolutions into them (conv_affine). Before any of that, 0. every subgraph computed from
constants alone is evaluated in float64 and stored once (constant_subgraphs), which turns
weight standardization (a BatchNormalization over a constant weight) into a plain weight.
Folded weights are new initializers (6) computed in float64 (7); BN nodes that normalize with
batch statistics of the data stop the fold with a clear error (8). Finally 11. the served graph
loses the exporter's scaffolding with exact rewrites only (lean).

Adding a rule is one new module holding its scaler (see scaling for the signature) plus one
entry in rules.RULES; the model card's `removed_by` values derive from that table.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import onnx

from ..errors import BatchStatisticsError, UnsupportedGraphError
from .affine_bn import rewrite_as_affine
from .batchnorm import BatchNorm, read_batch_norm
from .constant_subgraphs import ConstantFold, fold_constant_subgraphs
from .constants import materialize_parameters
from .conv_affine import AffineFold, fold_conv_affines
from .graph import Graph
from .lean import make_lean
from .naming import layer_name, unique_names
from .rules import REMOVED_BY, REWRITTEN_AS_AFFINE, RULES, FoldRule, Side, producer_rule
from .scaling import Affine

__all__ = [
    "REMOVED_BY",
    "RULES",
    "ConstantFold",
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
    method: str  # a rules.REMOVED_BY value
    target: str | None  # the node that absorbed it
    reason: str | None = None  # why a weaker method was used


@dataclass
class FoldResult:
    model: onnx.ModelProto
    layers: list[FoldedLayer] = field(default_factory=list)
    affine_folds: list[AffineFold] = field(default_factory=list)
    constant_folds: list[ConstantFold] = field(default_factory=list)


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
    result.constant_folds = fold_constant_subgraphs(graph)
    materialize_parameters(graph)
    batch_norms = find_batch_norms(graph)
    _materialize_parameters(graph, batch_norms)
    records = {id(bn.node): _record(bn) for bn in batch_norms}
    left = _apply_rules(graph, batch_norms, records)
    for bn in left:
        record = records[id(bn.node)]
        record.reason = _why_not_backward(graph, bn)
        if not rewrite_as_affine(graph, bn):
            raise UnsupportedGraphError(
                f"BatchNorm layer '{bn.layer}': the rank of its input '{bn.x}' is unknown, so "
                "it can be neither folded nor rewritten; expected an input with a known rank"
            )
        record.method = REWRITTEN_AS_AFFINE
        graph.reindex()
    result.layers = [records[id(bn.node)] for bn in batch_norms]
    result.affine_folds = fold_conv_affines(graph)
    graph.prune()
    remaining = [n.name for n in graph.nodes("BatchNormalization")]
    if remaining:  # defensive: every branch above removes its node
        raise UnsupportedGraphError(f"BatchNormalization nodes left after folding: {remaining}")
    result.model = make_lean(graph.model)
    return result


def _materialize_parameters(graph: Graph, batch_norms: list[BatchNorm]) -> None:
    """Point each BN at its resolved parameters, so the nodes that computed them (Shape/Expand
    for affine=False, CastLike, ...) become dead and stop counting as readers of activations."""
    for bn in batch_norms:
        for index, value in enumerate((bn.scale, bn.bias, bn.mean, bn.var), start=1):
            graph.set_input(bn.node, index, value.astype(bn.dtype))
    graph.prune()


def _record(bn: BatchNorm) -> FoldedLayer:
    return FoldedLayer(
        layer=bn.layer,
        onnx_node=bn.node.name,
        channels=bn.channels,
        epsilon=bn.epsilon,
        momentum=bn.momentum,
        method="",
        target=None,
    )


def _apply_rules(
    graph: Graph, batch_norms: list[BatchNorm], records: dict[int, FoldedLayer]
) -> list[BatchNorm]:
    """Try the table's rules in order, each on every BN still left, until a sweep removes none
    (a fold can enable another: a RepVGG identity branch needs its branch convs' BNs folded).
    Returns the BNs no rule took."""
    left = list(batch_norms)
    progress = True
    while progress and left:
        progress = False
        for rule in RULES:
            for bn in list(left):
                applied = _apply(graph, rule, bn)
                if applied is None:
                    continue
                record = records[id(bn.node)]
                record.method, record.target = rule.removed_by, applied[0].name
                record.reason = applied[1]
                left.remove(bn)
                graph.reindex()
                progress = True
                _retarget(graph, records.values(), applied[0].name)
    return left


def _retarget(graph: Graph, records, merged_into: str) -> None:
    """A rule that merges nodes (RepVGG's branch convs) removes earlier folds' targets: those
    folds now live in the node it merged them into."""
    live = {n.name for n in graph.graph.node}
    for record in records:
        if record.target is not None and record.target not in live:
            record.target = merged_into


def _apply(graph: Graph, rule: FoldRule, bn: BatchNorm) -> tuple[onnx.NodeProto, str | None] | None:
    """Fold `bn` by `rule`: the node that absorbed it and, for a reader rule, why no producer
    could; None with the graph untouched when the rule does not apply."""
    a, b = bn.affine()
    affine = Affine(a, b, bn.x, bn.y)
    if rule.side is Side.PRODUCER:
        producer = graph.producer.get(bn.x)
        if producer is None or producer.op_type != rule.op_type or not _standard(producer):
            return None
        if _producer_blocker(graph, bn) is not None:
            return None
        tail = rule.scale(graph, producer, affine)
        if tail is None:
            return None
        for reader in _shape_readers(graph, bn.x):
            reader.input[0] = bn.y  # same shape, and tail now produces it
        tail.output[0] = bn.y
        graph.remove(bn.node)
        return producer, None
    reader = graph.only_consumer(bn.y)
    if reader is None or reader.op_type != rule.op_type or not _standard(reader):
        return None
    reason = _why_not_backward(graph, bn)  # before the rule changes the graph
    target = rule.scale(graph, reader, affine)
    if target is None:
        return None
    graph.remove(bn.node)
    return target, reason


def _standard(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


def _why_not_backward(graph: Graph, bn: BatchNorm) -> str:
    """Why no producer rule took `bn`, for the record of a weaker method."""
    blocker = _producer_blocker(graph, bn)
    if blocker is not None:
        return blocker
    producer = graph.producer[bn.x]
    rule = producer_rule(producer.op_type)
    expected = rule.requires if rule else "a node a fold rule covers"
    return f"{producer.op_type} '{producer.name}' cannot absorb it exactly; expected {expected}"


def _producer_blocker(graph: Graph, bn: BatchNorm) -> str | None:
    """Why no producer rule can take `bn` as the graph stands, or None when one may."""
    producer = graph.producer.get(bn.x)
    if producer is None:
        kind = "a graph input" if bn.x in graph.graph_inputs else "not produced by a node"
        return f"its input '{bn.x}' is {kind}"
    producers = {rule.op_type for rule in RULES if rule.side is Side.PRODUCER}
    if producer.op_type not in producers:
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
