"""Rule 3: a per-channel affine after Gemm, or MatMul(+Add), folds into the weight and bias.

This is BatchNorm1d on (N, C): the channel axis 1 is the last axis, so the affine scales the
weight's output columns. A Linear on (N, C, L) followed by BatchNorm1d works on axis 1 while the
MatMul's columns are axis 2; scaling them would be wrong (and silently so when L == C). The
MatMul fold therefore requires a rank-2 output; anything else is left to the affine rule.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .graph import Graph, attribute, channel_vector, set_attribute
from .scaling import Affine


def scale_gemm_output(graph: Graph, gemm: onnx.NodeProto, affine: Affine) -> onnx.NodeProto | None:
    """Rewrite Y = alpha * A' B' + beta * C into a * Y + b per column of Y."""
    weight = graph.constant(gemm.input[1])
    if weight is None or weight.ndim != 2:
        return None
    trans_b = int(attribute(gemm, "transB", 0))
    columns = weight.shape[0] if trans_b else weight.shape[1]
    c = graph.optional_constant(gemm, 2, np.zeros((), weight.dtype))
    per_channel = affine.per_channel(columns)
    if c is None or per_channel is None:
        return None
    a, b = per_channel
    w64 = weight.astype(np.float64)
    new_weight = w64 * a[:, None] if trans_b else w64 * a[None, :]
    beta = float(attribute(gemm, "beta", 1.0))
    new_c = beta * c.astype(np.float64) * a + b  # broadcasts C's (), (N,), (1, N) or (M, N)
    graph.set_input(gemm, 1, new_weight.astype(weight.dtype))
    graph.set_input(gemm, 2, new_c.astype(weight.dtype))
    set_attribute(gemm, "beta", 1.0)
    return gemm


def scale_matmul_output(
    graph: Graph, node: onnx.NodeProto, affine: Affine
) -> onnx.NodeProto | None:
    """Fold into MatMul(x, W) or Add(MatMul(x, W), bias) with a rank-2 result.

    Returns the node whose output now carries a * y + b (an Add is appended after a bare MatMul),
    or None if the pattern does not hold.
    """
    matmul, add = (node, None) if node.op_type == "MatMul" else (None, node)
    bias = None
    if add is not None:
        for data, const in ((0, 1), (1, 0)):
            producer = graph.producer.get(add.input[data])
            value = graph.constant(add.input[const])
            if producer is not None and producer.op_type == "MatMul" and value is not None:
                matmul, bias, bias_name = producer, value, add.input[const]
                break
        if matmul is None or graph.only_consumer(matmul.output[0]) is not add:
            return None
    weight = graph.constant(matmul.input[1])
    if weight is None or weight.ndim != 2 or graph.rank(matmul.output[0]) != 2:
        return None
    columns = weight.shape[1]
    if bias is not None:
        bias = channel_vector(bias, 2)
        if bias is None or bias.size not in (1, columns):
            return None
    per_channel = affine.per_channel(columns)
    if per_channel is None:
        return None
    a, b = per_channel
    graph.set_input(matmul, 1, (weight.astype(np.float64) * a[None, :]).astype(weight.dtype))
    if add is not None:
        new_bias = (bias.astype(np.float64) * a + b).astype(weight.dtype)
        add.input[list(add.input).index(bias_name)] = graph.add_initializer(new_bias, bias_name)
        return add
    scaled = graph.fresh_name(matmul.output[0])
    offset = graph.add_initializer(b.astype(weight.dtype), f"{matmul.name or 'matmul'}.bias")
    new_add = helper.make_node("Add", [scaled, offset], [matmul.output[0]], name=f"{scaled}_add")
    matmul.output[0] = scaled
    graph.set_shape(scaled, graph.shape(new_add.output[0]))
    return graph.insert_after(matmul, [new_add])[0]
