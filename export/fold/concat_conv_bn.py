"""Rule 9: a per-channel affine after a Concat of convolutions along the channel axis folds into
each convolution, one channel slice apiece (timm's MixedConv2d in MixNet: split, one Conv per
kernel size, concat, BN).

Exact when channel c of the Concat is channel c - offset of exactly one Conv: the axis is 1, and
every Concat input is the single output of a Conv that nothing but the Concat reads (once). Any
doubt leaves the graph untouched, and the BN falls back to a later rule.
"""

from __future__ import annotations

import onnx

from .conv_bn import conv_parameters, scale_conv_output
from .graph import Graph, attribute
from .scaling import Affine


def scale_concat_output(
    graph: Graph, concat: onnx.NodeProto, affine: Affine
) -> onnx.NodeProto | None:
    """Rewrite each Conv feeding `concat` so that the Concat computes a * concat(...) + b."""
    rank = graph.rank(concat.output[0])
    axis = int(attribute(concat, "axis", 0))
    if rank is None or (axis + rank if axis < 0 else axis) != 1:
        return None
    convs, widths = [], []
    for name in concat.input:
        conv = graph.producer.get(name)
        if (
            conv is None
            or conv.op_type != "Conv"
            or conv.domain not in ("", "ai.onnx")
            or len([o for o in conv.output if o]) != 1
            or graph.only_consumer(name) is not concat
            or list(concat.input).count(name) != 1
        ):
            return None
        parameters = conv_parameters(graph, conv)
        if parameters is None:
            return None
        convs.append(conv)
        widths.append(parameters[0].shape[0])
    total = sum(widths)
    if affine.per_channel(total) is None:
        return None
    start = 0
    for conv, width in zip(convs, widths, strict=True):
        piece = affine.sliced(start, start + width, total)
        if piece is None or scale_conv_output(graph, conv, piece) is None:
            raise AssertionError(f"Conv '{conv.name}' refused a slice it was checked to take")
        start += width
    return concat
