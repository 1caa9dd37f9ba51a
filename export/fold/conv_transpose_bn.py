"""Rule 2: a per-channel affine after ConvTranspose folds into its weight and bias.

ConvTranspose's weight is (Cin, Cout/groups, k...): output channel o = g * (Cout/groups) + j is
made by W[:, j] of group g, so the scale goes on axis 1, group by group, not on axis 0.
"""

from __future__ import annotations

import numpy as np
import onnx

from .conv_bn import conv_parameters
from .graph import Graph, attribute
from .scaling import Affine


def scale_conv_transpose_output(
    graph: Graph, node: onnx.NodeProto, affine: Affine
) -> onnx.NodeProto | None:
    """Rewrite `node` to compute a * conv_transpose(x) + b per output channel."""
    groups = int(attribute(node, "group", 1))
    parameters = conv_parameters(graph, node, channels_axis=1, groups=groups)
    if parameters is None or parameters[0].shape[0] % groups:
        return None
    weight, bias = parameters
    per_group = weight.shape[1]
    per_channel = affine.per_channel(groups * per_group)
    if per_channel is None:
        return None
    a, b = per_channel
    kernel = weight.shape[2:]
    grouped = weight.astype(np.float64).reshape((groups, -1, per_group, *kernel))
    scale = a.reshape((groups, 1, per_group) + (1,) * len(kernel))
    new_weight = (grouped * scale).reshape(weight.shape)
    new_bias = bias.astype(np.float64) * a + b
    graph.set_input(node, 1, new_weight.astype(weight.dtype))
    graph.set_input(node, 2, new_bias.astype(weight.dtype))
    return node
