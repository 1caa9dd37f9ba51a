"""The capture API and the capture format's manifest (bnserve-capture/1): the contract."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

FORMAT = "bnserve-capture/1"


class CaptureStartRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_samples: int | None = Field(
        default=None,
        ge=1,
        description="stop after this many samples (<= BNSERVE_CAPTURE_MAX_SAMPLES)",
    )
    max_bytes: int | None = Field(
        default=None,
        ge=1,
        description="stop before storing more input bytes (<= BNSERVE_CAPTURE_MAX_BYTES)",
    )
    version: str | None = Field(
        default=None, description="version to capture; default: latest ready"
    )


class CaptureInput(BaseModel):
    name: str
    datatype: str = Field(description="KServe v2 datatype, e.g. FP32")
    shape: list[int] = Field(description="per-sample shape, without the batch axis")


class CaptureShard(BaseModel):
    index: int
    samples: int
    files: dict[str, str] = Field(description="input name -> .npy file in the capture folder")


class CaptureManifest(BaseModel):
    format: Literal["bnserve-capture/1"] = FORMAT
    model: str
    version: str
    capture_id: str
    started: str = Field(description="ISO-8601 UTC")
    stopped: str | None = None
    stop_reason: str | None = None
    samples: int = Field(description="samples in the shards listed")
    bytes: int = Field(description="input bytes in the shards listed (array data, no headers)")
    inputs: list[CaptureInput]
    shards: list[CaptureShard]


class CaptureStatus(BaseModel):
    model: str
    version: str
    capture_id: str
    state: Literal["running", "stopped"]
    started: str
    stopped: str | None = None
    stop_reason: str | None = None
    samples: int = Field(description="samples written to disk")
    bytes: int = Field(description="input bytes written to disk")
    pending_samples: int = Field(description="accepted, not yet written")
    dropped_samples: int = Field(description="dropped because the writer fell behind")
    skipped_samples: int = Field(description="requests whose per-sample shape differs")
    max_samples: int
    max_bytes: int
    path: str
