"""Reading an eval-mode BatchNormalization node as one exact per-channel affine (rule 7).

ONNX BatchNormalization computes y = scale * (x - mean) / sqrt(var + epsilon) + B per channel
(axis 1). Folding rewrites that as y = a * x + b with a = scale / sqrt(var + epsilon) and
b = B - mean * a, computed in float64 and cast back to the graph's dtype only when written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .batch_stats import batch_statistics_reason
from .graph import Graph, attribute

DEFAULT_EPSILON = 1e-5
DEFAULT_ONNX_MOMENTUM = 0.9


@dataclass
class BatchNorm:
    node: onnx.NodeProto
    layer: str
    channels: int
    epsilon: float
    momentum: float  # PyTorch's convention: new = (1 - momentum) * running + momentum * batch
    scale: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    dtype: np.dtype

    @property
    def x(self) -> str:
        return self.node.input[0]

    @property
    def y(self) -> str:
        return self.node.output[0]

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(a, b) in float64 with y = a * x + b per channel."""
        a = self.scale / np.sqrt(self.var + self.epsilon)
        return a, self.bias - self.mean * a


def read_batch_norm(graph: Graph, node: onnx.NodeProto, layer: str) -> BatchNorm | str:
    """The node's parameters, or the reason it is not an eval-mode BN that can be folded."""
    reason = batch_statistics_reason(graph, node)
    if reason:
        return reason
    if attribute(node, "spatial", 1) != 1:
        return "it uses per-activation statistics (spatial=0), which bnserve does not fold"
    params = [graph.constant(name) for name in node.input[1:5]]
    if any(p is None for p in params):
        return "its scale or bias is not a constant"
    scale, bias, mean, var = (np.asarray(p, dtype=np.float64).reshape(-1) for p in params)
    channels = max(p.size for p in (scale, bias, mean, var))
    try:
        scale, bias, mean, var = np.broadcast_arrays(scale, bias, mean, var)
    except ValueError:
        return "its scale, bias, mean and variance have different lengths"
    dtype = params[0].dtype if params[0].dtype.kind == "f" else np.dtype(np.float32)
    onnx_momentum = float(attribute(node, "momentum", DEFAULT_ONNX_MOMENTUM))
    return BatchNorm(
        node=node,
        layer=layer,
        channels=int(channels),
        epsilon=float(attribute(node, "epsilon", DEFAULT_EPSILON)),
        momentum=float(np.float32(1.0 - onnx_momentum)),
        scale=scale.copy(),
        bias=bias.copy(),
        mean=mean.copy(),
        var=var.copy(),
        dtype=np.dtype(dtype),
    )
