"""Exact population statistics for the BatchNorm nodes of an ONNX graph, with ONNX Runtime only.

The torch-free twin of statistics.set_population_statistics (PreciseBN): every
BatchNormalization node gets the pooled per-channel mean and biased variance of its input over
all calibration samples and positions, accumulated in float64 (Chan's parallel update), with the
BN layers upstream of it already set. Every BN input becomes a graph output and every running
mean and variance a graph input, so new statistics are fed rather than rebuilt into the graph.
Each pass measures every layer whose upstream BN layers are all final (a chain of L layers
costs L passes, parallel branches share them) and runs only the part of the graph those layers'
inputs need (ONNX Runtime itself runs every node whatever is fetched), so on average a pass
costs about half a forward pass, as PyTorch's stop-at-the-layer passes do.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import InvalidInputError
from .fold import find_batch_norms
from .fold.graph import Graph
from .onnx_io import cpu_session

CHUNK = 64
_MEAN, _VAR = 3, 4  # BatchNormalization input indices


@dataclass
class LayerStatistics:
    """One BN node's statistics in float64; count is the values per channel they pool."""

    layer: str
    onnx_node: str
    mean: np.ndarray
    var: np.ndarray
    eps: float
    count: int | None = None


def read_statistics(model: onnx.ModelProto) -> list[LayerStatistics]:
    """The running statistics stored in each BatchNormalization node, in graph order."""
    graph = Graph(copy.deepcopy(model))
    return [
        LayerStatistics(bn.layer, bn.node.name, bn.mean, bn.var, bn.epsilon)
        for bn in find_batch_norms(graph)
    ]


class _Moments:
    """Per-channel count, mean and sum of squared deviations, merged exactly in float64."""

    def __init__(self, channels: int) -> None:
        self.count = 0
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)

    def update(self, x: np.ndarray) -> None:
        values = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1).astype(np.float64)
        n = values.shape[1]
        if n == 0:
            return
        mean = values.mean(1)
        m2 = ((values - mean[:, None]) ** 2).sum(1)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total


def population_statistics(
    reference: onnx.ModelProto,
    inputs: list[np.ndarray],
    progress: Callable[[str], None] = lambda _s: None,
) -> tuple[onnx.ModelProto, list[LayerStatistics]]:
    """A copy of `reference` whose BN nodes hold the population statistics of `inputs`
    (arrays in graph input order, batch first), and those statistics in graph order."""
    model = copy.deepcopy(reference)
    graph = Graph(model)
    batch_norms = find_batch_norms(graph)
    if not batch_norms:
        raise InvalidInputError(
            "the source version's reference.onnx has no BatchNormalization node; expected a "
            "model with BatchNorm layers to recalibrate"
        )
    positions = {id(n): i for i, n in enumerate(graph.graph.node)}
    stat_dtypes = [
        (graph.constant(bn.node.input[_MEAN]).dtype, graph.constant(bn.node.input[_VAR]).dtype)
        for bn in batch_norms
    ]
    feeds_state = {
        k: (bn.mean.astype(stat_dtypes[k][0]), bn.var.astype(stat_dtypes[k][1]))
        for k, bn in enumerate(batch_norms)
    }
    probe, probe_inputs = _probe(model, batch_norms, positions, stat_dtypes)
    upstream = _upstream_batch_norms(model, batch_norms, positions)
    graph_inputs = [i.name for i in model.graph.input]
    done: set[int] = set()
    results: dict[int, LayerStatistics] = {}
    while len(done) < len(batch_norms):
        ready = [k for k in range(len(batch_norms)) if k not in done and upstream[k] <= done]
        names = ", ".join(batch_norms[k].layer for k in ready[:3])
        progress(f"Measuring {len(ready)} BatchNorm layer(s) ({names}{', ...' * (len(ready) > 3)})")
        moments = {k: _Moments(batch_norms[k].channels) for k in ready}
        fetch = sorted({batch_norms[k].x for k in ready} - set(graph_inputs))
        if fetch:
            part = _truncated(probe, fetch)
            session, wanted = cpu_session(part), {i.name for i in part.graph.input}
        for start in range(0, len(inputs[0]), CHUNK):
            chunk = [x[start : start + CHUNK] for x in inputs]
            feeds = dict(zip(graph_inputs, chunk, strict=True))
            for k, (mean, var) in feeds_state.items():
                feeds[probe_inputs[k][0]], feeds[probe_inputs[k][1]] = mean, var
            values = dict(feeds)
            if fetch:
                used = {name: value for name, value in feeds.items() if name in wanted}
                values.update(zip(fetch, session.run(fetch, used), strict=True))
            for k in ready:
                moments[k].update(values[batch_norms[k].x])
        for k in ready:
            bn, m = batch_norms[k], moments[k]
            if m.count < 2:
                raise InvalidInputError(
                    f"the capture gives BatchNorm layer '{bn.layer}' {m.count} value(s) per "
                    f"channel ({len(inputs[0])} sample(s) x positions per sample); expected at "
                    "least 2, since the variance of one value is 0 (capture more samples)"
                )
            var = m.m2 / m.count
            feeds_state[k] = (m.mean.astype(stat_dtypes[k][0]), var.astype(stat_dtypes[k][1]))
            results[k] = LayerStatistics(bn.layer, bn.node.name, m.mean, var, bn.epsilon, m.count)
        done.update(ready)
    _store(graph, batch_norms, feeds_state)
    return graph.model, [results[k] for k in range(len(batch_norms))]


def _probe(model, batch_norms, positions, stat_dtypes):
    """A copy of `model` with each BN's mean/var as graph inputs and its input as an output."""
    probe = copy.deepcopy(model)
    elem_types = _elem_types(model)
    names = []
    outputs = {o.name for o in probe.graph.output} | {i.name for i in probe.graph.input}
    for k, bn in enumerate(batch_norms):
        node = probe.graph.node[positions[id(bn.node)]]
        pair = (f"__bnserve_mean_{k}", f"__bnserve_var_{k}")
        for index, name, dtype in zip((_MEAN, _VAR), pair, stat_dtypes[k], strict=True):
            node.input[index] = name
            elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
            probe.graph.input.append(helper.make_tensor_value_info(name, elem, [bn.channels]))
        names.append(pair)
        if bn.x not in outputs:
            elem = elem_types.get(bn.x, helper.np_dtype_to_tensor_dtype(np.dtype(bn.dtype)))
            probe.graph.output.append(helper.make_tensor_value_info(bn.x, elem, None))
            outputs.add(bn.x)
    return probe, names


def _truncated(probe: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """The part of `probe` that computes `outputs`: nodes, inputs and initializers they need."""
    producer = {name: node for node in probe.graph.node for name in node.output if name}
    needed: set[str] = set()
    nodes: set[int] = set()
    stack = list(outputs)
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producer.get(name)
        if node is not None and id(node) not in nodes:
            nodes.add(id(node))
            stack.extend(i for i in node.input if i)
            stack.extend(_subgraph_reads(node))
    part = onnx.ModelProto()
    part.CopyFrom(probe)
    graph = part.graph
    keep_nodes = [n for n in probe.graph.node if id(n) in nodes]
    keep_inputs = [i for i in probe.graph.input if i.name in needed]
    keep_inits = [t for t in probe.graph.initializer if t.name in needed]
    by_name = {o.name: o for o in probe.graph.output}
    for field, values in (
        (graph.node, keep_nodes),
        (graph.input, keep_inputs),
        (graph.initializer, keep_inits),
        (graph.output, [by_name[name] for name in outputs]),
    ):
        del field[:]
        field.extend(values)
    return part


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Every name the subgraphs of an If/Loop/Scan node read (a superset of the outer-scope
    names they use: enough to keep what they need)."""
    names: set[str] = set()
    for attr in node.attribute:
        for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            for inner in sub.node:
                names.update(i for i in inner.input if i)
                names.update(_subgraph_reads(inner))
    return names


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # the fallback (the BN's parameter dtype) is right for nearly every graph
        inferred = model
    g = inferred.graph
    return {
        v.name: v.type.tensor_type.elem_type
        for v in [*g.input, *g.value_info, *g.output]
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type
    }


def _upstream_batch_norms(model, batch_norms, positions) -> list[set[int]]:
    """For each BN, the BNs its input depends on (one pass: ONNX nodes are topologically
    sorted)."""
    bn_at = {positions[id(bn.node)]: k for k, bn in enumerate(batch_norms)}
    upstream: dict[str, frozenset[int]] = {}
    for position, node in enumerate(model.graph.node):
        below = frozenset().union(*(upstream.get(name, frozenset()) for name in node.input))
        if position in bn_at:
            below = below | {bn_at[position]}
        for name in node.output:
            upstream[name] = below
    return [set(upstream.get(bn.x, frozenset())) for bn in batch_norms]


def _store(graph: Graph, batch_norms, values: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
    """Write the new statistics: in place where the tensor is this node's alone (names, and so
    layer names, stay as they were), else as a new initializer for this node."""
    graph.reindex()
    for k, bn in enumerate(batch_norms):
        for index, value in zip((_MEAN, _VAR), values[k], strict=True):
            name = bn.node.input[index]
            own = name in graph.initializers and len(graph.consumers[name]) == 1
            if own:
                graph.initializers[name].CopyFrom(numpy_helper.from_array(value, name))
            else:
                graph.set_input(bn.node, index, value)
    graph.prune()
