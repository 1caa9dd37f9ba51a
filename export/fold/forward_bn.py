"""Rule 4b: a BatchNormalization whose only reader is a Conv without padding, or a Gemm/MatMul
on (N, C), folds forward into that reader's weight and bias.

Conv(a * x + b) = Conv_{W * a}(x) + sum_k W * b, but only where every output position sees real
inputs: zero padding would pad a * x + b with zeros where the folded conv pads x with zeros,
which differ wherever b != 0. So a Conv with any padding is left to the affine rule.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .conv_bn import conv_parameters
from .graph import Graph, attribute, set_attribute
from .scaling import Affine


def _reads_affine_first(node: onnx.NodeProto, affine: Affine) -> bool:
    return node.input[0] == affine.y and list(node.input).count(affine.y) == 1


def fold_forward_into_conv(
    graph: Graph, conv: onnx.NodeProto, affine: Affine
) -> onnx.NodeProto | None:
    pads = attribute(conv, "pads", None)
    auto_pad = attribute(conv, "auto_pad", b"NOTSET")
    if not _reads_affine_first(conv, affine):
        return None
    if (pads is not None and any(pads)) or auto_pad not in (b"NOTSET", b"VALID"):
        return None
    parameters = conv_parameters(graph, conv)
    if parameters is None:
        return None
    weight, bias = parameters
    groups = int(attribute(conv, "group", 1))
    out_channels, in_per_group = weight.shape[:2]
    per_channel = affine.per_channel(groups * in_per_group)
    if per_channel is None or out_channels % groups:
        return None
    a, b = per_channel
    kernel = weight.shape[2:]
    # Output channel o of group g reads input channels g * in_per_group + i.
    w = weight.astype(np.float64).reshape((groups, out_channels // groups, in_per_group, *kernel))
    a_g = a.reshape((groups, 1, in_per_group) + (1,) * len(kernel))
    b_g = b.reshape((groups, 1, in_per_group) + (1,) * len(kernel))
    new_weight = (w * a_g).reshape(weight.shape)
    new_bias = bias.astype(np.float64) + (w * b_g).sum(axis=tuple(range(2, w.ndim))).reshape(-1)
    graph.set_input(conv, 1, new_weight.astype(weight.dtype))
    graph.set_input(conv, 2, new_bias.astype(weight.dtype))
    conv.input[0] = affine.x
    return conv


def fold_forward_into_gemm(
    graph: Graph, gemm: onnx.NodeProto, affine: Affine
) -> onnx.NodeProto | None:
    if not _reads_affine_first(gemm, affine):
        return None
    weight = graph.constant(gemm.input[1])
    if weight is None or weight.ndim != 2 or attribute(gemm, "transA", 0):
        return None
    trans_b = int(attribute(gemm, "transB", 0))
    w = weight.astype(np.float64).T if trans_b else weight.astype(np.float64)  # (K, N)
    c = graph.optional_constant(gemm, 2, np.zeros((), weight.dtype))
    per_channel = affine.per_channel(w.shape[0])
    if c is None or per_channel is None:
        return None
    a, b = per_channel
    alpha, beta = float(attribute(gemm, "alpha", 1.0)), float(attribute(gemm, "beta", 1.0))
    new_w = w * a[:, None]
    new_c = beta * c.astype(np.float64) + alpha * (b @ w)
    graph.set_input(gemm, 1, (new_w.T if trans_b else new_w).astype(weight.dtype))
    graph.set_input(gemm, 2, new_c.astype(weight.dtype))
    set_attribute(gemm, "beta", 1.0)
    gemm.input[0] = affine.x
    return gemm


def fold_forward_into_matmul(
    graph: Graph, matmul: onnx.NodeProto, affine: Affine
) -> onnx.NodeProto | None:
    """Only on (N, C): on higher ranks MatMul's contracted axis is the last, not the channels."""
    if not _reads_affine_first(matmul, affine) or graph.rank(affine.x) != 2:
        return None
    weight = graph.constant(matmul.input[1])
    if weight is None or weight.ndim != 2:
        return None
    per_channel = affine.per_channel(weight.shape[0])
    if per_channel is None:
        return None
    a, b = per_channel
    w = weight.astype(np.float64)
    graph.set_input(matmul, 1, (w * a[:, None]).astype(weight.dtype))
    product = graph.fresh_name(matmul.output[0])
    offset = graph.add_initializer((b @ w).astype(weight.dtype), f"{matmul.name or 'matmul'}.bias")
    add = helper.make_node("Add", [product, offset], [matmul.output[0]], name=f"{product}_add")
    graph.set_shape(product, graph.shape(matmul.output[0]))
    matmul.output[0] = product
    matmul.input[0] = affine.x
    graph.insert_after(matmul, [add])
    return matmul
