"""An index over an ONNX graph with the few safe rewrites the fold rules need.

Rewrites never modify an initializer in place: a folded weight is always written as a new
initializer (rule 6), so a tensor shared with another node keeps its value for that node.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

# Ops that may be evaluated at fold time when all their inputs are constant: enough to resolve
# parameters that exporters compute from buffers (affine=False BN, FrozenBatchNorm, CastLike).
_FOLDABLE_OPS = frozenset(
    {
        "Identity", "Cast", "CastLike", "Expand", "Reshape", "Unsqueeze", "Squeeze", "Flatten",
        "Concat", "Gather", "Slice", "Transpose", "Add", "Sub", "Mul", "Div", "Neg", "Sqrt",
        "Reciprocal", "Pow", "Abs", "Exp", "Log", "ConstantOfShape", "Range", "Size", "Tile",
    }
)  # fmt: skip


class Graph:
    """Producer/consumer index plus constant resolution for one ONNX model's main graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self._names = itertools.count()
        self._shapes: dict[str, list[int | None] | None] = {}
        self._elem_types: dict[str, int] = {}
        self._infer_shapes()
        self.reindex()

    # -- indexing -------------------------------------------------------------------------------
    def reindex(self) -> None:
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
            # Names a subgraph reads from the outer scope count as uses by the node holding it.
            for name in _outer_scope_reads(node):
                self.consumers[name].append(node)
        self.graph_outputs = {o.name for o in self.graph.output}
        self.graph_inputs = {i.name for i in self.graph.input}
        self._constants: dict[str, np.ndarray | None] = {}

    def _infer_shapes(self) -> None:
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model, data_prop=True)
        except Exception:  # an unusual graph still folds where ranks are known from elsewhere
            inferred = self.model
        g = inferred.graph
        for vi in itertools.chain(g.input, g.value_info, g.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                self._elem_types[vi.name] = vi.type.tensor_type.elem_type
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                dims = vi.type.tensor_type.shape.dim
                self._shapes[vi.name] = [
                    d.dim_value if d.HasField("dim_value") else None for d in dims
                ]
        for t in self.graph.initializer:
            self._shapes[t.name] = list(t.dims)
            self._elem_types[t.name] = t.data_type

    def shape(self, name: str) -> list[int | None] | None:
        """Static shape with None for unknown dims, or None when even the rank is unknown."""
        return self._shapes.get(name)

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def elem_type(self, name: str) -> int | None:
        """The ONNX element type of `name` where shape inference or the graph records it."""
        return self._elem_types.get(name)

    def set_shape(self, name: str, shape: list[int | None] | None) -> None:
        self._shapes[name] = shape

    def uses(self, name: str) -> int:
        """How many places read `name`: node inputs (one per node) plus graph outputs."""
        return len({id(n) for n in self.consumers.get(name, [])}) + (name in self.graph_outputs)

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        """The single node that reads `name`, if nothing else (graph output included) does."""
        readers = {id(n): n for n in self.consumers.get(name, [])}
        if len(readers) != 1 or name in self.graph_outputs:
            return None
        return next(iter(readers.values()))

    # -- constants ------------------------------------------------------------------------------
    def constant(self, name: str) -> np.ndarray | None:
        """The value of `name` if it is fixed at fold time, else None.

        Initializers that are also graph inputs can be overridden at run time, so they are not
        constants. Small computations on constants are evaluated with ONNX's reference evaluator.
        """
        if not name:
            return None
        if name not in self._constants:
            self._constants[name] = None  # guards against cycles while resolving
            self._constants[name] = self._resolve_constant(name)
        return self._constants[name]

    def _resolve_constant(self, name: str) -> np.ndarray | None:
        if name in self.graph_inputs:
            return None
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Constant":
            return _evaluate(node, {}, self.opset)[0]
        if node.op_type == "Shape":
            return self._static_shape_slice(node)
        if node.op_type == "CastLike":  # only the target's dtype matters, not its value
            value, target = self.constant(node.input[0]), self._elem_types.get(node.input[1])
            if value is None or target is None:
                return None
            return value.astype(onnx.helper.tensor_dtype_to_np_dtype(target))
        if node.op_type not in _FOLDABLE_OPS:
            return None
        values = {}
        for inp in node.input:
            if inp:
                value = self.constant(inp)
                if value is None:
                    return None
                values[inp] = value
        outputs = _evaluate(node, values, self.opset)
        return outputs[list(node.output).index(name)]

    def _static_shape_slice(self, node: onnx.NodeProto) -> np.ndarray | None:
        shape = self.shape(node.input[0])
        if shape is None:
            return None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        start, end = attrs.get("start", 0), attrs.get("end", len(shape))
        dims = shape[slice(start, end)]
        if any(d is None for d in dims):
            return None
        return np.array(dims, dtype=np.int64)

    # -- rewrites -------------------------------------------------------------------------------
    def fresh_name(self, base: str) -> str:
        taken = set(self.producer) | set(self.initializers) | self.graph_inputs
        while True:
            candidate = f"{base}__bnfold{next(self._names)}"
            if candidate not in taken:
                return candidate

    def add_initializer(self, value: np.ndarray, base: str) -> str:
        name = self.fresh_name(base)
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        self.initializers[name] = self.graph.initializer[-1]
        self._shapes[name] = list(value.shape)
        return name

    def optional_constant(
        self, node: onnx.NodeProto, index: int, default: np.ndarray
    ) -> np.ndarray | None:
        """An optional input's constant value, `default` when absent, None when not constant."""
        if len(node.input) <= index or not node.input[index]:
            return default
        return self.constant(node.input[index])

    def set_input(self, node: onnx.NodeProto, index: int, value: np.ndarray) -> None:
        """Point `node`'s input `index` at a new initializer holding `value` (never in place)."""
        present = len(node.input) > index and node.input[index]
        base = node.input[index] if present else f"{node.name or node.output[0]}.input{index}"
        name = self.add_initializer(value, base)
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = name

    def insert_after(
        self, anchor: onnx.NodeProto, nodes: Sequence[onnx.NodeProto]
    ) -> list[onnx.NodeProto]:
        """Insert copies of nodes right after `anchor` (keeping topological order); returns the
        inserted nodes as they live in the graph, since protobuf inserts copies."""
        position = next(i for i, n in enumerate(self.graph.node) if n is anchor)
        for offset, node in enumerate(nodes, start=1):
            self.graph.node.insert(position + offset, node)
        return [self.graph.node[position + offset] for offset in range(1, len(nodes) + 1)]

    def remove(self, node: onnx.NodeProto) -> None:
        position = next(i for i, n in enumerate(self.graph.node) if n is node)
        del self.graph.node[position]

    def prune(self) -> None:
        """Drop nodes whose outputs nobody reads and initializers no node reads."""
        changed = True
        while changed:
            self.reindex()
            dead = [
                n for n in self.graph.node
                if n.output and not any(self.uses(o) for o in n.output if o)
            ]  # fmt: skip
            for node in dead:
                self.remove(node)
            changed = bool(dead)
        used = {name for name, readers in self.consumers.items() if readers} | self.graph_outputs
        keep = [t for t in self.graph.initializer if t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)
        live = set(self.producer) | set(self.initializers) | self.graph_inputs
        stale = [vi for vi in self.graph.value_info if vi.name not in live]
        for vi in stale:
            self.graph.value_info.remove(vi)
        self.reindex()

    def nodes(self, op_type: str) -> Iterator[onnx.NodeProto]:
        standard = ("", "ai.onnx")
        return (n for n in list(self.graph.node) if n.op_type == op_type and n.domain in standard)


def attribute(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def set_attribute(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def channel_vector(value: np.ndarray, rank: int) -> np.ndarray | None:
    """`value` as a per-channel vector for a tensor of `rank` with channels on axis 1, else None.

    Broadcasting aligns trailing axes, so a (C,) constant on an (N, C, H, W) tensor scales W,
    not channels: only shapes whose every axis but axis 1 has size 1 qualify.
    """
    if value.ndim > rank:
        return None
    padded = (1,) * (rank - value.ndim) + value.shape
    if any(d != 1 for axis, d in enumerate(padded) if axis != 1):
        return None
    return value.reshape(-1)


def _outer_scope_reads(node: onnx.NodeProto) -> set[str]:
    names: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for sub in graphs:
            local = {i.name for i in sub.input} | {t.name for t in sub.initializer}
            for inner in sub.node:
                local.update(inner.output)
            for inner in sub.node:
                names.update(i for i in inner.input if i and i not in local)
                names.update(_outer_scope_reads(inner) - local)
            names.update(o.name for o in sub.output if o.name not in local)
    return names


def _evaluate(node: onnx.NodeProto, values: dict[str, np.ndarray], opset: int) -> list[np.ndarray]:
    return ReferenceEvaluator(node, opsets={"": opset}).run(None, values)
