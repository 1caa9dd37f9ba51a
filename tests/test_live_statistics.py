"""The pooled moments behind live drift: Chan's merge of per-batch (count, mean, M2) equals the
float64 population statistics of all the values however they are split into batches, and
windows roll, keep their history and reset on a clock."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from service.drift.live import Moments, WindowedStatistics
from service.drift.monitor import CPU_BURST_SECONDS, CpuBudget


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    channels=st.integers(1, 5),
    offset=st.floats(-1e3, 1e3),
    scale=st.floats(1e-2, 1e2),
    seed=st.integers(0, 2**32 - 1),
)
def test_merged_batches_equal_the_population_statistics(sizes, channels, offset, scale, seed):
    rng = np.random.default_rng(seed)
    batches = [rng.standard_normal((n, channels)) * scale + offset for n in sizes]
    pooled = Moments.empty(channels)
    for b in batches:  # per batch: mean and biased variance, as the statistics graph gives
        pooled.merge(Moments.of_batch(len(b), b.mean(0), b.var(0)))
    everything = np.concatenate(batches)
    assert pooled.count == len(everything)
    # The merge itself loses nothing: float64 agreement to rounding, even where the mean is
    # 1e5 standard deviations from zero (a naive sum of squares would lose every digit).
    np.testing.assert_allclose(pooled.mean, everything.mean(0), rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(pooled.var, everything.var(0), rtol=1e-7)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def one(value: float) -> list[Moments]:
    return [Moments.of_batch(1, np.array([value]), np.array([0.0]))]


def test_windows_roll_keep_their_history_and_reset():
    clock = Clock()
    windows = WindowedStatistics([1], seconds=10, history=2, clock=clock)
    windows.add(one(1.0), 1, 1)
    clock.now += 10.5
    windows.add(one(3.0), 1, 1)
    current, history = windows.snapshot()
    assert [w.layers[0].mean[0] for w in history] == [1.0]
    assert history[0].end == 1010.0
    assert current.start == 1010.0
    assert current.layers[0].mean[0] == 3.0
    clock.now += 35  # idle: one window closes, no empty ones pile up
    current, history = windows.snapshot()
    assert len(history) == 2
    assert current.start == 1040.0
    assert current.samples == 0
    clock.now += 1
    windows.reset()
    current, history = windows.snapshot()
    assert current.start == 1046.5
    assert len(history) == 2  # at most `history` kept, oldest dropped
    assert history[-1].end == 1046.5


def test_the_cpu_budget_banks_its_share_and_pauses_until_a_debt_is_repaid():
    clock = Clock()
    budget = CpuBudget(0.02, clock=clock)
    assert budget.allows()  # starts with the banked burst: 0.02 x 10 s = 0.2 s
    budget.spend(0.5)  # one long run overdraws it by 0.3 s ...
    clock.now += 14.9
    assert not budget.allows()  # ... repaid at 0.02 s per second: 15 s
    clock.now += 0.2
    assert budget.allows()
    clock.now += 1000  # idle time banks at most the burst
    assert budget.allows()
    budget.spend(0.02 * CPU_BURST_SECONDS)
    assert not budget.allows()
    assert CpuBudget(0.0, clock=clock).allows()  # 0: unbounded
