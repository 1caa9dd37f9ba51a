"""Rule 10: a BatchNormalization on the identity branch of a re-parameterizable block (RepVGG,
MobileOne): Add(Add(conv_kxk(x), conv_1x1(x)), BN(x)) in any association order, the branch BNs
already folded into their convs, becomes one Conv, as RepVGG's own deploy conversion does.

conv_kxk(x) + conv_1x1(x) + a * x + b = conv_W(x) + bias with W = W_kxk + W_1x1 (zero-padded to
k x k, centered) + a on the centre tap of each channel's own input, bias = the sum of biases + b.
Exact when every branch reads the same x and preserves its shape with the same grouping: stride
1, dilation 1, odd kernels padded by (k - 1) / 2 on both sides, as many output as input channels
(so x + conv(x) needs no broadcast), one group count, and each branch and intermediate sum read
only by the sum. Anything else leaves the graph untouched.
"""

from __future__ import annotations

import numpy as np
import onnx

from .conv_bn import conv_parameters
from .graph import Graph, attribute
from .scaling import Affine

_MAX_DEPTH = 4  # sums of a handful of branches; a deeper chain is not a block


def merge_identity_branch(
    graph: Graph, add: onnx.NodeProto, affine: Affine
) -> onnx.NodeProto | None:
    """Turn the smallest Add tree above `add` that sums BN(x) with convs of x into one Conv."""
    top = add
    for _ in range(_MAX_DEPTH):
        tree = _sum_tree(graph, top)
        if tree is not None:
            adds, leaves = tree
            target = _merge(graph, leaves, affine)
            if target is not None:
                target.output[0] = top.output[0]
                for node in adds:
                    graph.remove(node)
                return target
        parent = graph.only_consumer(top.output[0])
        if parent is None or parent.op_type != "Add" or parent.input[0] == parent.input[1]:
            return None
        top = parent
    return None


def _sum_tree(graph: Graph, top: onnx.NodeProto) -> tuple[list[onnx.NodeProto], list[str]] | None:
    """The Adds under `top` (inner ones read only by their parent) and the summed leaves."""
    adds, leaves, stack = [], [], [top]
    while stack:
        node = stack.pop()
        if len(node.input) != 2 or node.domain not in ("", "ai.onnx"):
            return None
        adds.append(node)
        for name in node.input:
            inner = graph.producer.get(name)
            if inner is not None and inner.op_type == "Add" and graph.only_consumer(name) is node:
                stack.append(inner)
            else:
                leaves.append(name)
    return adds, leaves


def _merge(graph: Graph, leaves: list[str], affine: Affine) -> onnx.NodeProto | None:
    if leaves.count(affine.y) != 1 or len(set(leaves)) != len(leaves):
        return None
    branches = []
    for name in leaves:
        if name == affine.y:
            continue
        conv = graph.producer.get(name)
        if conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx"):
            return None
        if graph.only_consumer(name) is None or len([o for o in conv.output if o]) != 1:
            return None
        parameters = conv_parameters(graph, conv)
        if parameters is None or not _shape_preserving(conv, parameters[0], affine.x):
            return None
        branches.append((conv, *parameters))
    if not branches:
        return None
    groups = {int(attribute(conv, "group", 1)) for conv, _, _ in branches}
    dtypes = {weight.dtype for _, weight, _ in branches}
    ranks = {weight.ndim for _, weight, _ in branches}
    shapes = {weight.shape[:2] for _, weight, _ in branches}
    if len(groups) != 1 or len(dtypes) != 1 or len(ranks) != 1 or len(shapes) != 1:
        return None
    (group,), ((channels, in_per_group),) = groups, shapes
    if channels != group * in_per_group:  # x + conv(x) must not broadcast channels
        return None
    per_channel = affine.per_channel(channels)
    if per_channel is None:
        return None
    a, b = per_channel
    kernel = tuple(max(w.shape[d] for _, w, _ in branches) for d in range(2, next(iter(ranks))))
    weight = np.zeros((channels, in_per_group, *kernel))
    bias = np.asarray(b, np.float64).copy()
    for _, w, conv_bias in branches:
        offsets = [(k - s) // 2 for k, s in zip(kernel, w.shape[2:], strict=True)]
        window = tuple(slice(o, o + s) for o, s in zip(offsets, w.shape[2:], strict=True))
        weight[(slice(None), slice(None), *window)] += w.astype(np.float64)
        bias += conv_bias.astype(np.float64)
    centre = tuple(k // 2 for k in kernel)
    for o in range(channels):  # channel o reads itself as input o % in_per_group of its group
        weight[(o, o % in_per_group, *centre)] += a[o]
    target = max(branches, key=lambda branch: branch[1].size)[0]
    dtype = next(iter(dtypes))
    graph.set_input(target, 1, weight.astype(dtype))
    graph.set_input(target, 2, bias.astype(dtype))
    _set_pads(target, [k // 2 for k in kernel])
    for conv, _, _ in branches:
        if conv is not target:
            graph.remove(conv)
    return target


def _shape_preserving(conv: onnx.NodeProto, weight: np.ndarray, x: str) -> bool:
    """Stride 1, dilation 1, odd kernel padded by (k - 1) / 2 on both sides, reading x."""
    if conv.input[0] != x or attribute(conv, "auto_pad", b"NOTSET") != b"NOTSET":
        return False
    kernel = list(weight.shape[2:])
    if list(attribute(conv, "kernel_shape", kernel)) != kernel or any(k % 2 == 0 for k in kernel):
        return False
    ones = [1] * len(kernel)
    if list(attribute(conv, "strides", ones)) != ones:
        return False
    if list(attribute(conv, "dilations", ones)) != ones:
        return False
    return list(attribute(conv, "pads", [0] * 2 * len(kernel))) == [k // 2 for k in kernel] * 2


def _set_pads(conv: onnx.NodeProto, half: list[int]) -> None:
    for name, value in (("pads", half * 2), ("kernel_shape", None)):
        for i, a in enumerate(conv.attribute):
            if a.name == name:
                del conv.attribute[i]
                break
        if value is not None:
            conv.attribute.append(onnx.helper.make_attribute(name, value))
