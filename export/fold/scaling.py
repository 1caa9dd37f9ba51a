"""The one signature every fold rule's scaler has (see rules.RULES).

A scaler gets the node a per-channel affine y = a * x + b should disappear into and rewrites the
graph so that it does, or leaves the graph untouched and returns None when that is not exact:

    scaler(graph, node, affine) -> onnx.NodeProto | None

Producer rules (the node computes x): the returned node's output now carries a * x + b; the
dispatcher renames it to y. Reader rules (the node reads y): the node now reads x and computes
what it computed from y; the returned node is the one that absorbed the affine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from .graph import Graph


@dataclass(frozen=True)
class Affine:
    """y = a * x + b per channel (axis 1); a and b are float64 vectors of one length (C or 1)."""

    a: np.ndarray
    b: np.ndarray
    x: str
    y: str

    def per_channel(self, channels: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(a, b) as float64 vectors of length `channels`, None when they cannot broadcast."""
        if self.a.size not in (1, channels) or self.b.size not in (1, channels):
            return None
        shape = (channels,)
        return (
            np.broadcast_to(np.asarray(self.a, np.float64).reshape(-1), shape),
            np.broadcast_to(np.asarray(self.b, np.float64).reshape(-1), shape),
        )

    def sliced(self, start: int, stop: int, channels: int) -> Affine | None:
        """The affine of channels [start, stop) when the whole has `channels` channels."""
        full = self.per_channel(channels)
        if full is None:
            return None
        return Affine(full[0][start:stop], full[1][start:stop], self.x, self.y)


Scaler = Callable[[Graph, onnx.NodeProto, Affine], onnx.NodeProto | None]
