"""Rule 5: per-channel Mul/Add/Sub/Div by constants right after a Conv or ConvTranspose (the
FrozenBatchNorm pattern x * scale + shift) fold into the convolution's weight and bias.

Each step folds one elementwise node whose constant is per-channel on axis 1 (see
`channel_vector`); chains fold one node at a time until none is left.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .graph import Graph, channel_vector
from .rules import constant_affine_scalers
from .scaling import Affine


@dataclass
class AffineFold:
    node: str
    op_type: str
    into: str


def fold_conv_affines(graph: Graph) -> list[AffineFold]:
    folds: list[AffineFold] = []
    scalers = constant_affine_scalers()
    progress = True
    while progress:
        progress = False
        for conv in [n for n in graph.graph.node if n.op_type in scalers]:
            step = _fold_next(graph, conv, scalers)
            if step:
                folds.append(step)
                graph.reindex()
                progress = True
    return folds


def _fold_next(graph: Graph, conv: onnx.NodeProto, scalers) -> AffineFold | None:
    out = conv.output[0]
    reader = graph.only_consumer(out)
    weight = graph.constant(conv.input[1])
    if reader is None or weight is None or reader.op_type not in ("Mul", "Add", "Sub", "Div"):
        return None
    if list(reader.input).count(out) != 1:
        return None
    position = list(reader.input).index(out)
    value = graph.constant(reader.input[1 - position])
    if value is None or value.dtype != weight.dtype:
        return None
    vector = channel_vector(value, weight.ndim)  # conv output rank equals weight rank
    if vector is None:  # the scaler refuses a vector wider than the channels (it would broadcast)
        return None
    c = vector.astype(np.float64)
    if reader.op_type == "Mul":
        a, b = c, np.zeros_like(c)
    elif reader.op_type == "Add":
        a, b = np.ones_like(c), c
    elif reader.op_type == "Sub" and position == 0:  # conv - c; c - conv negates and is rarer
        a, b = np.ones_like(c), -c
    elif reader.op_type == "Div" and position == 0 and np.all(c != 0):
        a, b = 1.0 / c, np.zeros_like(c)
    else:
        return None
    if scalers[conv.op_type](graph, conv, Affine(a, b, out, reader.output[0])) is None:
        return None
    conv.output[0] = reader.output[0]
    graph.remove(reader)
    return AffineFold(node=reader.name or reader.output[0], op_type=reader.op_type, into=conv.name)
