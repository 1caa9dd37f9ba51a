"""Per model version statistics in Triton's statistics-extension schema (what perf_analyzer and
tritonclient.get_inference_statistics read). Updated on the event loop only: no locks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass(slots=True)
class RunTiming:
    """Filled in by the batch scheduler for one request: seconds queued and in session.run."""

    queue: float = 0.0
    compute: float = 0.0


@dataclass(slots=True)
class BatchDurations:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class ModelStatistics:
    """Triton's meaning: success/fail are whole requests, queue and compute_* per request
    (a batch's run counts for each request in it), inference_count counts samples and
    execution_count model runs; batch_stats are per executed batch size."""

    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchDurations] = field(default_factory=dict)

    def executed(self, batch_size: int, seconds: float) -> None:
        """One model run (of one or several requests' samples)."""
        self.execution_count += 1
        batch = self.batches.get(batch_size)
        if batch is None:
            batch = self.batches[batch_size] = BatchDurations()
        batch.compute_infer.add(seconds)

    def succeeded(
        self, total: float, samples: int, timing: RunTiming, decode: float, encode: float
    ):
        """All of one request's figures at once: perf_analyzer requires the compute counts of
        any two snapshots to agree, so none may lag behind the others."""
        self.success.add(total)
        self.inference_count += samples
        self.queue.add(timing.queue)
        self.compute_input.add(decode)
        self.compute_infer.add(timing.compute)
        self.compute_output.add(encode)
        self.last_inference_ms = int(time.time() * 1000)

    def failed(self, total: float) -> None:
        self.fail.add(total)

    def as_dict(self, name: str, version: str) -> dict:
        """The JSON form of Triton's ModelStatistics message (REST and gRPC codecs)."""
        stats = {
            "success": self.success,
            "fail": self.fail,
            "queue": self.queue,
            "compute_input": self.compute_input,
            "compute_infer": self.compute_infer,
            "compute_output": self.compute_output,
            "cache_hit": Duration(),
            "cache_miss": Duration(),
        }
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {k: v.as_dict() for k, v in stats.items()},
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": b.compute_input.as_dict(),
                    "compute_infer": b.compute_infer.as_dict(),
                    "compute_output": b.compute_output.as_dict(),
                }
                for size, b in sorted(self.batches.items())
            ],
        }
