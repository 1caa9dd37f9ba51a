"""Pooled BatchNorm-input statistics over served traffic: per-channel count, mean and M2 in
float64, merged batch by batch with Chan's parallel formula, in time windows.

Memory is O(layers x channels) per window; no input is kept. A batch of one request merged
into a window contributes exactly what it would to the population statistics of all the
requests the window saw, so batch-of-one traffic yields population statistics.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Moments:
    """count values per channel, their per-channel mean and sum of squared deviations (M2)."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, channels: int) -> Moments:
        return cls(0, np.zeros(channels, np.float64), np.zeros(channels, np.float64))

    @classmethod
    def of_batch(cls, count: int, mean: np.ndarray, var: np.ndarray) -> Moments:
        """From one batch's per-channel mean and biased variance over `count` values each."""
        mean = np.asarray(mean, np.float64)
        return cls(count, mean, np.maximum(np.asarray(var, np.float64), 0.0) * count)

    def merge(self, other: Moments) -> None:
        """Chan et al.: exact for any split of the values, and stable (no sum of squares)."""
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2 = other.count, other.mean.copy(), other.m2.copy()
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / total)
        self.m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / total)
        self.count = total

    @property
    def var(self) -> np.ndarray:
        """Biased (population) variance, as BatchNorm's statistics are."""
        return self.m2 / self.count if self.count else np.zeros_like(self.m2)


@dataclass
class Window:
    start: float  # wall-clock seconds (time.time)
    end: float | None  # None while current
    layers: list[Moments]
    samples: int = 0  # samples (batch items) merged
    requests: int = 0  # requests they came from

    def add(self, per_layer: list[Moments], samples: int, requests: int) -> None:
        for acc, batch in zip(self.layers, per_layer, strict=True):
            acc.merge(batch)
        self.samples += samples
        self.requests += requests

    def snapshot(self, now: float) -> Window:
        return Window(
            start=self.start,
            end=self.end if self.end is not None else now,
            layers=[Moments(m.count, m.mean.copy(), m.m2.copy()) for m in self.layers],
            samples=self.samples,
            requests=self.requests,
        )


@dataclass
class WindowedStatistics:
    """A current window plus up to `history` closed ones; thread-safe."""

    channels: list[int]
    seconds: float
    history: int
    clock: Callable[[], float] = time.time
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.current = self._new(self.clock())
        self.closed: deque[Window] = deque(maxlen=self.history)  # maxlen 0 keeps none

    def _new(self, start: float) -> Window:
        return Window(start=start, end=None, layers=[Moments.empty(c) for c in self.channels])

    def _roll(self, now: float) -> None:
        """Close the current window when its time is up; idle periods leave no empty windows
        beyond the one they end (the next window starts at the first window boundary <= now)."""
        if now - self.current.start < self.seconds:
            return
        elapsed = int((now - self.current.start) // self.seconds)
        self.current.end = self.current.start + self.seconds
        self._close(self.current)
        self.current = self._new(self.current.start + elapsed * self.seconds)

    def _close(self, window: Window) -> None:
        self.closed.append(window)

    def add(self, per_layer: list[Moments], samples: int, requests: int) -> None:
        with self._lock:
            self._roll(self.clock())
            self.current.add(per_layer, samples, requests)

    def reset(self) -> None:
        """Close the current window now and start a new one."""
        with self._lock:
            now = self.clock()
            self._roll(now)
            self.current.end = now
            self._close(self.current)
            self.current = self._new(now)

    def snapshot(self) -> tuple[Window, list[Window]]:
        """The current window and the closed ones, oldest first, as copies."""
        with self._lock:
            now = self.clock()
            self._roll(now)
            return self.current.snapshot(now), [w.snapshot(now) for w in self.closed]
