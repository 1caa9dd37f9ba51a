"""Rule 4a: a BatchNormalization with no producer it can fold into becomes one exact per-channel
affine, y = x * a + b (Mul then Add), with a and b shaped (C, 1, ..., 1) for channel axis 1.

This covers BN used as input scaling (its input is a graph input), BN after an activation, and BN
whose producer has other consumers or is a graph output: those consumers keep reading the
producer's unchanged output.
"""

from __future__ import annotations

from onnx import helper

from .batchnorm import BatchNorm
from .graph import Graph


def rewrite_as_affine(graph: Graph, bn: BatchNorm) -> bool:
    """Replace `bn` by Mul+Add in place; False when the input's rank is unknown."""
    rank = graph.rank(bn.x)
    if rank is None or rank < 2:
        return False
    a, b = bn.affine()
    shape = (bn.channels,) + (1,) * (rank - 2)
    scale = graph.add_initializer(a.reshape(shape).astype(bn.dtype), f"{bn.layer}.fold_scale")
    shift = graph.add_initializer(b.reshape(shape).astype(bn.dtype), f"{bn.layer}.fold_shift")
    scaled = graph.fresh_name(f"{bn.layer}.scaled")
    name = bn.node.name or bn.layer
    nodes = [
        helper.make_node("Mul", [bn.x, scale], [scaled], name=f"{name}/scale"),
        helper.make_node("Add", [scaled, shift], [bn.y], name=f"{name}/shift"),
    ]
    graph.insert_after(bn.node, nodes)
    graph.remove(bn.node)
    graph.set_shape(scaled, graph.shape(bn.x))
    return True
