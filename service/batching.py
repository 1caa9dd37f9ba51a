"""Per-model request queue with dynamic batching.

Every request for a model version goes through its bounded queue; past max_queue_size the
service answers 503 with Retry-After instead of growing memory. One worker per version takes
requests off the queue: it waits up to max_queue_delay for more to arrive (or until a preferred
batch size or max_batch_size is reached), concatenates them along the batch axis, runs one
session.run off the event loop, and splits the outputs back. Only requests whose per-sample
shapes agree are batched together. With max_batch_size <= 1 each request runs alone.

The direct path: with batching off, an empty queue and a free slot there is nothing to wait
for or to batch with, so a request runs at once, without the queue and the worker task (same
checks, same statistics). A model whose session.run is measured to take less than
`inline_run_us` per sample (the least of its recent run times, not counting the thread hop) runs
on the event loop itself: handing ~50 µs of work to a thread costs several times that. That
run is a plain call (`run_inline`), and a run's metrics and statistics are recorded after the
request's answer is written (metrics.later, service/bookkeeping.py).

Batching preserves deterministic eval mode: ONNX Runtime computes each sample's rows the same
way whatever else is in the batch (tests check bitwise equality), and every sample's output
depends only on that sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .dataplane.statistics import ModelStatistics, RunTiming
from .errors import Unavailable
from .metrics import Metrics


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 0  # samples; <= 1 turns batching off
    max_queue_delay_us: int = 500
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 256  # requests waiting
    workers: int = 1  # batches run at once (each on its own executor thread)
    inline_run_us: int = 100  # direct runs faster than this per sample stay on the loop; 0 = off

    @property
    def enabled(self) -> bool:
        return self.max_batch_size > 1

    def triton(self) -> dict:
        if not self.enabled:
            return {}
        return {
            "preferred_batch_size": list(self.preferred_batch_sizes),
            "max_queue_delay_microseconds": self.max_queue_delay_us,
        }


@dataclass
class _Pending:
    tensors: dict[str, np.ndarray]
    size: int
    signature: tuple
    future: asyncio.Future
    timing: RunTiming | None = None
    enqueued: float = field(default_factory=time.perf_counter)


RUN_WINDOW = 32  # recent runs the inline decision looks at


class BatchScheduler:
    def __init__(
        self,
        name: str,
        run,
        executor,
        config: BatchingConfig,
        metrics: Metrics,
        *,
        statistics: ModelStatistics | None = None,
    ):
        self.name = name
        self.statistics = statistics or ModelStatistics()
        self.run = run  # dict[str, ndarray] -> dict[str, ndarray], thread-safe session.run
        self.executor = executor
        self.config = config
        self.metrics = metrics
        self.queue: deque[_Pending] = deque()
        self._arrival = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._busy = 0  # batches running now (worker tasks, direct runs)
        self._slots = max(config.workers, 1)
        self._recent_batch_seconds = 0.05
        # session.run seconds per sample over the last runs, measured around the call itself.
        # Their minimum, not their mean: a run on the model's thread is timed until that thread
        # holds the GIL again, so the event loop's (or the log writer's) work while it ran only
        # ever adds to it, and an average would keep a tiny model off the loop for good.
        self._recent_runs: deque[float] = deque(maxlen=RUN_WINDOW)
        self.run_seconds_per_sample: float | None = None

    def full(self) -> Unavailable | None:
        """The 503 to answer when the queue is full (counted as a rejection), else None."""
        if len(self.queue) < self.config.max_queue_size:
            return None
        self.metrics.rejected.labels(self.name, "queue_full").inc()
        per_batch = max(self.config.max_batch_size, 1) * max(self.config.workers, 1)
        return Unavailable(
            f"model '{self.name}' has {len(self.queue)} requests queued, the limit "
            f"(BNSERVE_MAX_QUEUE_SIZE={self.config.max_queue_size}); retry later",
            retry_after=self._recent_batch_seconds * len(self.queue) / per_batch,
        )

    async def submit(
        self, tensors: dict[str, np.ndarray], size: int, timing: RunTiming | None = None
    ) -> dict[str, np.ndarray]:
        rejection = self.full()
        if rejection is not None:
            raise rejection
        if self.direct():
            if self.inline(size):
                return self.run_inline(tensors, size, timing)
            return await self._direct(tensors, size, timing)
        loop = asyncio.get_running_loop()
        if self._worker is None:
            self._worker = loop.create_task(self._work(), name=f"batcher-{self.name}")
        signature = tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(tensors.items()))
        pending = _Pending(tensors, size, signature, loop.create_future(), timing)
        self.queue.append(pending)
        self._arrival.set()
        return await pending.future  # cancelled by a timeout: the worker skips it

    def can_run_inline(self, size: int) -> bool:
        """Whether a request of `size` samples submitted now would run at once on the event
        loop: a direct run (see `direct`) of a tiny model (see `inline`)."""
        return self.direct() and self.inline(size)

    def run_inline(
        self, tensors: dict[str, np.ndarray], size: int, timing: RunTiming | None = None
    ) -> dict[str, np.ndarray]:
        """Run a request here and now, on the event loop (the caller checked
        `can_run_inline`). Plain, not a coroutine: this is most of a small model's requests,
        and three coroutine layers cost more than its checks."""
        self._busy += 1
        try:
            outputs, run_started, seconds = self._timed_run(tensors)
        finally:
            self._release()
        self._ran_direct(run_started, run_started, seconds, size, timing)
        return outputs

    def direct(self) -> bool:
        """Whether a request submitted now runs at once (batching off, nothing queued, a
        slot free)."""
        return not self.config.enabled and not self.queue and self._busy < self._slots

    def inline(self, size: int) -> bool:
        """Whether a direct run of `size` samples is cheap enough to do on the event loop."""
        per_sample = self.run_seconds_per_sample
        return per_sample is not None and per_sample * size * 1e6 < self.config.inline_run_us

    def _timed_run(
        self, tensors: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], float, float]:
        """session.run, when it started and its own duration (no hop, no queue), on whichever
        thread runs it."""
        started = time.perf_counter()
        outputs = self.run(tensors)
        return outputs, started, time.perf_counter() - started

    def _measured(self, run_seconds: float, samples: int) -> None:
        self._recent_runs.append(run_seconds / max(samples, 1))
        self.run_seconds_per_sample = min(self._recent_runs)

    def _release(self) -> None:
        self._busy -= 1
        self._slot_freed.set()

    async def _direct(
        self, tensors: dict[str, np.ndarray], size: int, timing: RunTiming | None
    ) -> dict[str, np.ndarray]:
        """Run one request now on the model's thread (batching off, queue empty, slot free,
        too long a run for the loop). A timeout abandons the wait, not the run: the slot stays
        taken until the thread is done."""
        started = time.perf_counter()
        self._busy += 1
        future = asyncio.get_running_loop().run_in_executor(self.executor, self._timed_run, tensors)

        def done(future: asyncio.Future) -> None:  # runs before the awaiting request resumes
            self._release()
            if not future.cancelled() and future.exception() is None:
                _, run_started, seconds = future.result()
                self._ran_direct(started, run_started, seconds, size, timing)

        future.add_done_callback(done)
        outputs, _, _ = await asyncio.shield(future)
        return outputs

    def _ran_direct(
        self, started: float, run_started: float, seconds: float, size: int, timing
    ) -> None:
        """A direct run's queue time is the wait for its thread (or ~1 µs on the loop)."""
        queued = run_started - started
        if timing is not None:
            timing.queue = queued
        self._ran(run_started, seconds, size, timing, queued)

    def _ran(
        self, started: float, run_seconds: float, samples: int, timing, queued: float | None = None
    ) -> float:
        """After one successful run of `samples` samples (on the loop): the request's timing
        now, the metrics and statistics later (metrics.later); returns the seconds since
        `started`."""
        elapsed = time.perf_counter() - started
        if timing is not None:
            timing.compute = elapsed
        self.metrics.later(self._record, elapsed, run_seconds, samples, queued)
        return elapsed

    def _record(
        self, elapsed: float, run_seconds: float, samples: int, queued: float | None
    ) -> None:
        if queued is not None:  # a direct run's; batched requests' are observed as they start
            self.metrics.queue_time.labels(self.name).observe(queued)
        self._measured(run_seconds, samples)
        self._recent_batch_seconds = 0.8 * self._recent_batch_seconds + 0.2 * elapsed
        self.metrics.compute_time.labels(self.name).observe(elapsed)
        self.metrics.batch_size.labels(self.name).observe(samples)
        self.statistics.executed(samples, elapsed)

    async def _work(self) -> None:
        def finished(task: asyncio.Task) -> None:
            self._running.discard(task)
            self._release()

        while True:
            await self._arrival.wait()
            self._arrival.clear()
            while self.queue:
                while self._busy >= self._slots:  # the next batch forms while others compute
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
                batch = await self._collect()
                if not batch:
                    continue
                self._busy += 1
                task = asyncio.get_running_loop().create_task(self._execute(batch))
                self._running.add(task)
                task.add_done_callback(finished)

    async def _collect(self) -> list[_Pending]:
        """Wait (at most max_queue_delay after the oldest arrival) for a fuller batch."""
        config = self.config
        if config.enabled:
            deadline = self.queue[0].enqueued + config.max_queue_delay_us / 1e6
            while True:
                queued = self._compatible_samples()
                if queued >= config.max_batch_size or queued in config.preferred_batch_sizes:
                    break
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrival.wait(), remaining)
                self._arrival.clear()
        return self._take()

    def _compatible_samples(self) -> int:
        live = [p for p in self.queue if not p.future.done()]
        if not live:
            return 0
        return sum(p.size for p in live if p.signature == live[0].signature)

    def _take(self) -> list[_Pending]:
        """The oldest live request plus compatible ones, up to max_batch_size samples."""
        while self.queue and self.queue[0].future.done():
            self.queue.popleft()  # its request timed out or went away
        if not self.queue:
            return []
        first = self.queue.popleft()
        batch, samples = [first], first.size
        if self.config.enabled:
            kept: deque[_Pending] = deque()
            while self.queue:
                pending = self.queue.popleft()
                if pending.future.done():
                    continue
                fits = samples + pending.size <= self.config.max_batch_size
                if fits and pending.signature == first.signature:
                    batch.append(pending)
                    samples += pending.size
                else:
                    kept.append(pending)
            self.queue.extendleft(reversed(kept))
        return batch

    async def _execute(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        queue_time = self.metrics.queue_time.labels(self.name)
        for pending in batch:
            queue_time.observe(started - pending.enqueued)
            if pending.timing is not None:
                pending.timing.queue = started - pending.enqueued
        if len(batch) == 1:
            tensors = batch[0].tensors
        else:
            tensors = {k: np.concatenate([p.tensors[k] for p in batch]) for k in batch[0].tensors}
        loop = asyncio.get_running_loop()
        try:
            outputs, _, run_seconds = await loop.run_in_executor(
                self.executor, self._timed_run, tensors
            )
        except Exception as exc:  # a failed run fails its requests, not the worker
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        samples = sum(p.size for p in batch)
        elapsed = self._ran(started, run_seconds, samples, None)
        offset = 0
        for pending in batch:
            if pending.timing is not None:
                pending.timing.compute = elapsed
            if not pending.future.done():
                part = {k: v[offset : offset + pending.size] for k, v in outputs.items()}
                pending.future.set_result(part if len(batch) > 1 else outputs)
            offset += pending.size

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        for task in self._running:
            task.cancel()
        for pending in self.queue:
            if not pending.future.done():
                pending.future.set_exception(Unavailable(f"model '{self.name}' was unloaded"))
        self.queue.clear()
