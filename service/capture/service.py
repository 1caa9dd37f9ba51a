"""The captures of one server: the folder check at start-up, start/stop/status, and the
registry hook that routes each version's requests to its running capture."""

from __future__ import annotations

import logging
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from ..config import Settings
from ..errors import BadRequest, NotFound
from .schemas import CaptureStartRequest, CaptureStatus
from .writer import Capture

log = logging.getLogger("bnserve.capture")


class CaptureDirError(Exception):
    """BNSERVE_CAPTURE_DIR is set but cannot be written; the server must not start."""


def check_capture_dir(path: Path) -> None:
    """Create the folder and prove a file can be written there, or say which setting is wrong."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".bnserve-write-test-"):
            pass
    except OSError as exc:
        raise CaptureDirError(
            f"BNSERVE_CAPTURE_DIR={path} is not writable ({exc.strerror or exc}); expected a "
            "folder the server can create files in, or leave BNSERVE_CAPTURE_DIR unset to turn "
            "traffic capture off"
        ) from None


class CaptureService:
    """The captures of one server, at most one running per model."""

    def __init__(self, settings: Settings) -> None:
        self.root = settings.capture_dir
        self.max_samples, self.max_bytes = settings.capture_max_samples, settings.capture_max_bytes
        if self.root is not None:
            check_capture_dir(self.root)
        self.captures: dict[str, Capture] = {}  # by model name: the running or last one

    def attach(self, model) -> None:
        """Registry load hook: route the version's requests to its running capture."""
        if self.root is None:
            return

        def observe(tensors: dict[str, np.ndarray], size: int) -> None:
            capture = self.captures.get(model.name)
            if capture is not None and capture.running and capture.version == str(model.version):
                try:
                    capture.offer(tensors, size)
                except Exception as exc:  # capture must never fail a request
                    log.exception("capture failed")
                    capture.stop(f"capture failed: {type(exc).__name__}: {exc}")

        model.observers.append(observe)
        model.on_close.append(_StopOnClose(self, model.name, str(model.version)).close)

    def enabled(self) -> Path:
        if self.root is None:
            raise NotFound("traffic capture is off: BNSERVE_CAPTURE_DIR is not set")
        return self.root

    def start(self, model, request: CaptureStartRequest) -> CaptureStatus:
        root = self.enabled()
        current = self.captures.get(model.name)
        if current is not None and current.running:
            raise BadRequest(
                f"model '{model.name}' already has capture {current.capture_id} running; "
                "expected a stop first"
            )
        bounds = {}
        for key, limit in (("max_samples", self.max_samples), ("max_bytes", self.max_bytes)):
            value = getattr(request, key)
            if value is not None and value > limit:
                raise BadRequest(
                    f"{key} {value} is over the server's limit BNSERVE_CAPTURE_{key.upper()}="
                    f"{limit}; expected at most {limit}"
                )
            bounds[key] = value or limit
        folder_base = root / model.name / str(model.version)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        capture_id, n = stamp, 1
        while (folder_base / capture_id).exists():
            n += 1
            capture_id = f"{stamp}-{n}"
        try:
            capture = Capture(model, folder_base / capture_id, capture_id, **bounds)
        except OSError as exc:
            raise BadRequest(
                f"cannot create the capture folder in BNSERVE_CAPTURE_DIR: {exc}"
            ) from None
        self.captures[model.name] = capture
        log.info(
            "capture %s of %s v%s started in %s",
            capture_id,
            model.name,
            model.version,
            capture.folder,
        )
        return capture.status()

    def last(self, name: str) -> Capture:
        self.enabled()
        capture = self.captures.get(name)
        if capture is None:
            raise NotFound(f"model '{name}' has no capture; expected a start first")
        return capture

    def stop(self, name: str) -> Capture:
        """Stop it; its writer then writes the last shard and manifest (Capture.wait)."""
        capture = self.last(name)
        capture.stop("stopped through the API")
        return capture

    def close(self) -> None:
        for capture in self.captures.values():
            capture.stop("server shut down")
            capture.wait(5.0)


class _StopOnClose:
    """Closed with its model version (unloaded or replaced): its capture stops."""

    def __init__(self, service: CaptureService, name: str, version: str) -> None:
        self.service, self.name, self.version = service, name, version

    def close(self) -> None:
        capture = self.service.captures.get(self.name)
        if capture is not None and capture.version == self.version:
            capture.stop("model version unloaded")
