"""Rule 1: a per-channel affine after Conv (1d/2d/3d, any stride, dilation and groups, with or
without bias) folds into the Conv's weight and bias.

Conv's weight is (Cout, Cin/groups, k...), so output channel o is scaled by scaling W[o] and
the bias becomes bias * a + b. Groups do not matter: each output channel has its own filter.
"""

from __future__ import annotations

import numpy as np
import onnx

from .graph import Graph
from .scaling import Affine


def conv_parameters(
    graph: Graph, conv: onnx.NodeProto, channels_axis: int = 0, groups: int = 1
) -> tuple[np.ndarray, np.ndarray] | None:
    """A convolution's constant weight and its bias as a (Cout,) vector (zeros if absent), or
    None when either is not a constant of the shapes ONNX specifies."""
    weight = graph.constant(conv.input[1])
    if weight is None or weight.ndim < 3:
        return None
    channels = weight.shape[channels_axis] * groups
    bias = graph.optional_constant(conv, 2, np.zeros(channels, weight.dtype))
    if bias is None or bias.shape != (channels,):
        return None
    return weight, bias


def scale_conv_output(graph: Graph, conv: onnx.NodeProto, affine: Affine) -> onnx.NodeProto | None:
    """Rewrite `conv` to compute a * conv(x) + b per output channel; None if it cannot be."""
    parameters = conv_parameters(graph, conv)
    if parameters is None:
        return None
    weight, bias = parameters
    per_channel = affine.per_channel(weight.shape[0])
    if per_channel is None:
        return None
    a, b = per_channel
    new_weight = weight.astype(np.float64) * a.reshape((-1,) + (1,) * (weight.ndim - 1))
    new_bias = bias.astype(np.float64) * a + b
    graph.set_input(conv, 1, new_weight.astype(weight.dtype))
    graph.set_input(conv, 2, new_bias.astype(weight.dtype))
    return conv
