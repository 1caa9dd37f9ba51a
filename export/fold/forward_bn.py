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

from .batchnorm import BatchNorm
from .conv_bn import conv_parameters
from .graph import Graph, attribute, set_attribute


def fold_forward(graph: Graph, bn: BatchNorm) -> onnx.NodeProto | None:
    """Fold `bn` into its only reader; returns that reader, or None if that is not exact."""
    reader = graph.only_consumer(bn.y)
    if reader is None or list(reader.input).count(bn.y) != 1 or reader.input[0] != bn.y:
        return None
    a, b = bn.affine()
    if reader.op_type == "Conv":
        done = _into_conv(graph, reader, a, b)
    elif reader.op_type == "Gemm":
        done = _into_gemm(graph, reader, a, b)
    elif reader.op_type == "MatMul" and graph.rank(bn.x) == 2:
        done = _into_matmul(graph, reader, a, b)
    else:
        done = False
    if not done:
        return None
    reader.input[0] = bn.x
    graph.remove(bn.node)
    return reader


def _into_conv(graph: Graph, conv: onnx.NodeProto, a: np.ndarray, b: np.ndarray) -> bool:
    pads = attribute(conv, "pads", None)
    auto_pad = attribute(conv, "auto_pad", b"NOTSET")
    if (pads is not None and any(pads)) or auto_pad not in (b"NOTSET", b"VALID"):
        return False
    parameters = conv_parameters(graph, conv)
    if parameters is None:
        return False
    weight, bias = parameters
    groups = int(attribute(conv, "group", 1))
    out_channels, in_per_group = weight.shape[:2]
    if a.size != groups * in_per_group or out_channels % groups:
        return False
    kernel = weight.shape[2:]
    # Output channel o of group g reads input channels g * in_per_group + i.
    w = weight.astype(np.float64).reshape((groups, out_channels // groups, in_per_group, *kernel))
    a_g = a.reshape((groups, 1, in_per_group) + (1,) * len(kernel))
    b_g = b.reshape((groups, 1, in_per_group) + (1,) * len(kernel))
    new_weight = (w * a_g).reshape(weight.shape)
    new_bias = bias.astype(np.float64) + (w * b_g).sum(axis=tuple(range(2, w.ndim))).reshape(-1)
    graph.set_input(conv, 1, new_weight.astype(weight.dtype))
    graph.set_input(conv, 2, new_bias.astype(weight.dtype))
    return True


def _into_gemm(graph: Graph, gemm: onnx.NodeProto, a: np.ndarray, b: np.ndarray) -> bool:
    weight = graph.constant(gemm.input[1])
    if weight is None or weight.ndim != 2 or attribute(gemm, "transA", 0):
        return False
    trans_b = int(attribute(gemm, "transB", 0))
    w = weight.astype(np.float64).T if trans_b else weight.astype(np.float64)  # (K, N)
    if w.shape[0] != a.size:
        return False
    c = graph.optional_constant(gemm, 2, np.zeros((), weight.dtype))
    if c is None:
        return False
    alpha, beta = float(attribute(gemm, "alpha", 1.0)), float(attribute(gemm, "beta", 1.0))
    new_w = w * a[:, None]
    new_c = beta * c.astype(np.float64) + alpha * (b @ w)
    graph.set_input(gemm, 1, (new_w.T if trans_b else new_w).astype(weight.dtype))
    graph.set_input(gemm, 2, new_c.astype(weight.dtype))
    set_attribute(gemm, "beta", 1.0)
    return True


def _into_matmul(graph: Graph, matmul: onnx.NodeProto, a: np.ndarray, b: np.ndarray) -> bool:
    weight = graph.constant(matmul.input[1])
    if weight is None or weight.ndim != 2 or weight.shape[0] != a.size:
        return False
    w = weight.astype(np.float64)
    graph.set_input(matmul, 1, (w * a[:, None]).astype(weight.dtype))
    product = graph.fresh_name(matmul.output[0])
    offset = graph.add_initializer((b @ w).astype(weight.dtype), f"{matmul.name or 'matmul'}.bias")
    add = helper.make_node("Add", [product, offset], [matmul.output[0]], name=f"{product}_add")
    graph.set_shape(product, graph.shape(matmul.output[0]))
    matmul.output[0] = product
    graph.insert_after(matmul, [add])
    return True
