"""Rule 0: every subgraph computed from constants alone is evaluated once, in float64, and
stored as an initializer in the graph's own dtype, before any BatchNorm rule runs.

This is what turns weight standardization (timm's StdConv2d/ScaledStdConv2d: F.batch_norm over
the weight with training=True, exported as a BatchNormalization whose mean and variance are
ReduceMeans of a constant) into the plain weight it is, so that rule 8 sees only statistics
of the data. Floating-point intermediates are kept in float64 (Cast and CastLike between float
types do not round) and each result is cast to its declared dtype once. The same pass removes
exporter scaffolding (Constant nodes, shape arithmetic on static shapes) from the served graph.

Not folded: nodes with subgraphs, random ops, other domains, a Shape of a dynamic dimension,
anything whose evaluation fails (left as it was), and results bigger than both 2**16 elements
and the largest constant they are computed from (an Expand to a huge tensor stays an Expand).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper
from onnx.reference import ReferenceEvaluator

from .graph import Graph, attribute

_RANDOM = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
     "Bernoulli", "Dropout"}
)  # fmt: skip
_FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
     onnx.TensorProto.BFLOAT16}
)  # fmt: skip
SMALL = 1 << 16


@dataclass
class ConstantFold:
    """One tensor of the input graph computed from constants, now stored as an initializer."""

    tensor: str  # its name in the input graph (reference.onnx)
    nodes: int  # how many nodes computed it
    op_types: list[str]
    read_by: list[str]  # the input graph's nodes that read it


def fold_constant_subgraphs(graph: Graph) -> list[ConstantFold]:
    """Replace every constant-only subgraph by initializers; the folds that computed something
    (a bare Constant node moved to an initializer is not listed)."""
    constant_nodes = _constant_nodes(graph)
    if not constant_nodes:
        return []
    produced = {name: node for node in constant_nodes for name in node.output if name}
    constant_ids = {id(n) for n in constant_nodes}
    frontier = [
        name
        for name in produced
        if name not in graph.graph_outputs
        and any(id(reader) not in constant_ids for reader in graph.consumers.get(name, []))
    ]
    evaluator = _Float64Evaluator(graph, produced)
    folds: list[ConstantFold] = []
    for name in frontier:
        dtype = graph.elem_type(name)
        value = evaluator.value(name)
        if value is None or dtype is None:
            continue
        largest = max((_size(graph, source) for source in evaluator.sources(name)), default=0)
        if value.size > max(SMALL, largest):
            continue
        native = value.astype(helper.tensor_dtype_to_np_dtype(dtype))
        new = graph.add_initializer(native, name)
        readers = [r for r in graph.consumers.get(name, []) if id(r) not in constant_ids]
        for reader in readers:
            for i, inp in enumerate(reader.input):
                if inp == name:
                    reader.input[i] = new
        ancestry = evaluator.ancestry(name)
        if [n.op_type for n in ancestry] != ["Constant"]:
            folds.append(
                ConstantFold(
                    tensor=name,
                    nodes=len(ancestry),
                    op_types=sorted({n.op_type for n in ancestry}),
                    read_by=[r.name or r.output[0] for r in readers],
                )
            )
    graph.prune()
    return folds


def _constant_nodes(graph: Graph) -> list[onnx.NodeProto]:
    """Nodes whose every output is fixed at export time, in graph order."""
    constant: set[str] = set()
    nodes = []
    for node in graph.graph.node:
        if not _foldable(node):
            continue
        if node.op_type == "Shape":
            ok = graph.constant(node.output[0]) is not None  # a static slice of the shape
        elif node.op_type == "CastLike":  # only the target's dtype matters, not its value
            ok = _is_constant(graph, node.input[0], constant) and (
                graph.elem_type(node.input[1]) is not None
            )
        else:
            ok = all(_is_constant(graph, name, constant) for name in node.input if name)
        if ok:
            nodes.append(node)
            constant.update(name for name in node.output if name)
    return nodes


def _foldable(node: onnx.NodeProto) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type in _RANDOM:
        return False
    if not any(name for name in node.output):
        return False
    return not any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute
    )


def _is_constant(graph: Graph, name: str, computed: set[str]) -> bool:
    if name in graph.graph_inputs:
        return False
    return name in graph.initializers or name in computed


class _Float64Evaluator:
    """Values of constant tensors with floating-point data held in float64 throughout."""

    def __init__(self, graph: Graph, produced: dict[str, onnx.NodeProto]) -> None:
        self.graph = graph
        self.produced = produced
        self.values: dict[str, np.ndarray | None] = {}

    def value(self, name: str) -> np.ndarray | None:
        if name in self.values:
            return self.values[name]
        if name in self.graph.initializers:
            return _float64(self.graph.constant(name))
        node = self.produced[name]
        outputs = self._run(node)
        for out, val in zip(node.output, outputs or [None] * len(node.output), strict=False):
            if out:
                self.values[out] = val
        return self.values.get(name)

    def _run(self, node: onnx.NodeProto) -> list[np.ndarray | None] | None:
        graph = self.graph
        if node.op_type == "Shape":
            return [graph.constant(node.output[0])]
        if node.op_type == "CastLike":  # the target is read for its dtype only
            value = self.value(node.input[0])
            return None if value is None else [_cast(value, graph.elem_type(node.input[1]))]
        inputs = [self.value(name) if name else None for name in node.input]
        if any(v is None for name, v in zip(node.input, inputs, strict=True) if name):
            return None
        if node.op_type == "Cast":
            return [_cast(inputs[0], int(attribute(node, "to")))]
        try:
            feeds = {name: v for name, v in zip(node.input, inputs, strict=True) if name}
            results = ReferenceEvaluator(node, opsets={"": graph.opset}).run(None, feeds)
        except Exception:  # an op the reference evaluator cannot run stays in the graph
            return None
        return [_float64(np.asarray(r)) for r in results]

    def ancestry(self, name: str) -> list[onnx.NodeProto]:
        """The nodes `name` was computed from."""
        seen: dict[int, onnx.NodeProto] = {}
        stack = [name]
        while stack:
            node = self.produced.get(stack.pop())
            if node is None or id(node) in seen:
                continue
            seen[id(node)] = node
            if node.op_type == "CastLike":
                stack.append(node.input[0])
            elif node.op_type != "Shape":
                stack.extend(i for i in node.input if i)
        return list(seen.values())

    def sources(self, name: str) -> list[str]:
        """The initializers `name` was computed from."""
        found = []
        for node in self.ancestry(name):
            inputs = node.input[:1] if node.op_type == "CastLike" else node.input
            if node.op_type != "Shape":
                found.extend(i for i in inputs if i in self.graph.initializers)
        return found


def _size(graph: Graph, initializer: str) -> int:
    return int(np.prod(graph.initializers[initializer].dims))


def _float64(value: np.ndarray | None) -> np.ndarray | None:
    if value is None or value.dtype.kind != "f":
        return value
    return value.astype(np.float64)


def _cast(value: np.ndarray, to: int | None) -> np.ndarray | None:
    if to is None:
        return None
    if to in _FLOAT_TYPES:
        return _float64(value) if value.dtype.kind == "f" else value.astype(np.float64)
    return value.astype(helper.tensor_dtype_to_np_dtype(to))
