"""One capture of one model version: accepting samples on the request path (bounded, O(1))
and writing .npy shards and the manifest on a thread of its own."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from ..errors import BadRequest
from ..protocol.datatypes import numpy_dtype
from .schemas import CaptureInput, CaptureManifest, CaptureShard, CaptureStatus

log = logging.getLogger("bnserve.capture")
SHARD_SAMPLES = 1024  # samples per shard at most
SHARD_BYTES = 16 * 1024 * 1024  # input bytes per shard at most
FLUSH_IDLE_SECONDS = 2.0  # a partial shard is written after this long without new samples
MAX_QUEUED_BYTES = 64 * 1024 * 1024  # inputs waiting for the writer; beyond: dropped


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _file_part(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


class Capture:
    """One capture of one model version, from start to stop."""

    def __init__(self, model, folder: Path, capture_id: str, max_samples: int, max_bytes: int):
        self.model_name, self.version = model.name, str(model.version)
        self.capture_id, self.folder = capture_id, folder
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.started, self.stopped, self.stop_reason = _now(), None, None
        self.inputs = []
        for spec in model.inputs:
            if not spec.shape or spec.shape[0] != -1:
                raise BadRequest(
                    f"model '{model.name}' input '{spec.name}' has no batch axis (shape "
                    f"{spec.shape}); capture expects inputs whose first dimension is -1"
                )
            self.inputs.append(
                CaptureInput(name=spec.name, datatype=spec.datatype, shape=list(spec.shape[1:]))
            )
        self.dtypes = {i.name: numpy_dtype(i.datatype) for i in self.inputs}
        self.accepted = self.accepted_bytes = 0  # bounds are checked on accepted samples
        self.samples = self.bytes = 0  # written
        self.dropped = self.skipped = 0
        self.shards: list[CaptureShard] = []
        self.queue: deque[tuple[dict[str, np.ndarray], int]] = deque()
        self.queued_samples = self.queued_bytes = 0
        self.running = True
        self._wake = threading.Condition()
        self.folder.mkdir(parents=True)
        self._write_manifest()
        self._thread = threading.Thread(
            target=self._write, name=f"capture-{model.name}", daemon=True
        )
        self._thread.start()

    # -- the request path --------------------------------------------------------------------
    def offer(self, tensors: dict[str, np.ndarray], size: int) -> None:
        if not self.running or size <= 0:
            return
        if not self._fits(tensors):
            self.skipped += size
            return
        per_sample = sum(t.nbytes for t in tensors.values()) // size
        room = min(
            self.max_samples - self.accepted,
            (self.max_bytes - self.accepted_bytes) // max(per_sample, 1),
        )
        take = max(min(size, room), 0)
        if take:
            if take < size:
                tensors = {k: v[:take] for k, v in tensors.items()}
            self.accepted += take
            self.accepted_bytes += take * per_sample
            if self.queued_bytes + take * per_sample > MAX_QUEUED_BYTES:
                self.dropped += take
            else:
                with self._wake:
                    self.queue.append((tensors, take))
                    self.queued_samples += take
                    self.queued_bytes += take * per_sample
                    self._wake.notify()
        if take < size:  # the next sample would break a bound
            if self.accepted >= self.max_samples:
                self.stop(f"max_samples reached ({self.max_samples} samples)")
            else:
                self.stop(f"max_bytes reached (next sample would exceed {self.max_bytes} bytes)")

    def _fits(self, tensors: dict[str, np.ndarray]) -> bool:
        if set(tensors) != set(self.dtypes):
            return False
        for spec in self.inputs:
            t = tensors[spec.name]
            if t.dtype != self.dtypes[spec.name] or len(t.shape) != len(spec.shape) + 1:
                return False
            if any(d not in (-1, a) for d, a in zip(spec.shape, t.shape[1:], strict=True)):
                return False
        for spec in self.inputs:  # dynamic dimensions: the first request fixes them
            if -1 in spec.shape:
                spec.shape = list(tensors[spec.name].shape[1:])
        return True

    def stop(self, reason: str) -> None:
        with self._wake:
            if not self.running:
                return
            self.running = False
            self.stopped, self.stop_reason = _now(), reason
            self._wake.notify()
        log.info(
            "capture %s of %s v%s stopped: %s",
            self.capture_id,
            self.model_name,
            self.version,
            reason,
        )

    # -- the writer thread -------------------------------------------------------------------
    def _write(self) -> None:
        pending: list[tuple[dict[str, np.ndarray], int]] = []
        pending_samples = pending_bytes = 0
        last = time.monotonic()
        while True:
            with self._wake:
                if not self.queue and self.running:
                    self._wake.wait(FLUSH_IDLE_SECONDS / 2)
                items = list(self.queue)
                self.queue.clear()
                done = not self.running
            for tensors, size in items:
                pending.append((tensors, size))
                pending_samples += size
                pending_bytes += sum(t.nbytes for t in tensors.values())
                last = time.monotonic()
                if pending_samples >= SHARD_SAMPLES or pending_bytes >= SHARD_BYTES:
                    self._flush(pending)
                    pending, pending_samples, pending_bytes = [], 0, 0
            idle = time.monotonic() - last >= FLUSH_IDLE_SECONDS
            if pending and (done or idle):
                self._flush(pending)
                pending, pending_samples, pending_bytes = [], 0, 0
            if done:
                with self._wake:
                    self.queued_samples = self.queued_bytes = 0
                self._write_manifest()
                return

    def _flush(self, items: list[tuple[dict[str, np.ndarray], int]]) -> None:
        index = len(self.shards)
        files, samples, nbytes = {}, sum(size for _, size in items), 0
        try:
            for spec in self.inputs:
                array = np.concatenate([t[spec.name] for t, _ in items])
                name = f"shard-{index:05d}.{_file_part(spec.name)}.npy"
                temporary = self.folder / f".{name}.tmp"
                with open(temporary, "wb") as f:
                    np.save(f, np.ascontiguousarray(array), allow_pickle=False)
                os.replace(temporary, self.folder / name)
                files[spec.name], nbytes = name, nbytes + array.nbytes
        except OSError as exc:
            self.stop(f"write failed: {exc.strerror or exc}")
            return
        self.shards.append(CaptureShard(index=index, samples=samples, files=files))
        self.samples += samples
        self.bytes += nbytes
        with self._wake:
            self.queued_samples -= samples
            self.queued_bytes -= nbytes
        self._write_manifest()

    def manifest(self) -> CaptureManifest:
        return CaptureManifest(
            model=self.model_name, version=self.version, capture_id=self.capture_id,
            started=self.started, stopped=self.stopped, stop_reason=self.stop_reason,
            samples=self.samples, bytes=self.bytes, inputs=self.inputs, shards=list(self.shards),
        )  # fmt: skip

    def _write_manifest(self) -> None:
        temporary = self.folder / ".manifest.json.tmp"
        try:
            temporary.write_text(json.dumps(self.manifest().model_dump(), indent=1))
            os.replace(temporary, self.folder / "manifest.json")
        except OSError as exc:
            log.error("capture %s: cannot write its manifest: %s", self.capture_id, exc)

    def wait(self, timeout: float) -> None:
        self._thread.join(timeout)

    def status(self) -> CaptureStatus:
        return CaptureStatus(
            model=self.model_name, version=self.version, capture_id=self.capture_id,
            state="running" if self.running else "stopped", started=self.started,
            stopped=self.stopped, stop_reason=self.stop_reason, samples=self.samples,
            bytes=self.bytes, pending_samples=max(self.queued_samples, 0),
            dropped_samples=self.dropped, skipped_samples=self.skipped,
            max_samples=self.max_samples, max_bytes=self.max_bytes, path=str(self.folder),
        )  # fmt: skip
