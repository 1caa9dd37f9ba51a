"""The live stat-drift response: pooled BatchNorm-input statistics of served traffic."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .schemas import PathStatistics

LiveVerdict = Literal["ok", "warn", "drift", "insufficient"]


class LiveLayerDrift(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str = Field(description="PyTorch module path from model.json")
    onnx_node: str
    channels: int
    values_per_channel: int = Field(description="sampled values behind each channel statistic")
    values_needed: int = Field(
        description="values per channel a verdict needs: the noise floor must be at most half "
        "the warn threshold"
    )
    score: float | None = Field(
        default=None, description="wasserstein_mean of the pooled statistics; null if insufficient"
    )
    noise_floor: float | None = Field(default=None, description="sqrt(1.5 / values_per_channel)")
    verdict: LiveVerdict = Field(description="from score - noise_floor against the thresholds")
    global_path: PathStatistics | None = Field(
        default=None,
        alias="global",
        description="the served eval path, pooled over the window's sampled requests",
    )


class LiveSummary(BaseModel):
    verdict: LiveVerdict = Field(
        description="drift/warn when a layer with enough values says so; insufficient while "
        "any layer lacks values and none says warn or drift; else ok"
    )
    score: float | None = Field(default=None, description="the largest judged layer score")
    most_drifted: list[str] = Field(description="up to three judged layers, largest score first")
    drifted_layers: list[str] = Field(description="every layer whose verdict is drift")
    samples_needed: int | None = Field(
        default=None, description="more samples this window needs before every layer is judged"
    )
    thresholds: dict[str, float]
    explanation: str


class LiveWindow(BaseModel):
    start: datetime
    end: datetime = Field(description="for the current window: now")
    current: bool
    samples: int = Field(description="sampled batch items merged into this window")
    requests: int = Field(description="sampled requests they came from")
    summary: LiveSummary
    layers: list[LiveLayerDrift]


class LiveMonitorStatus(BaseModel):
    sample_rate: float = Field(description="BNSERVE_DRIFT_SAMPLE_RATE: share of requests sampled")
    max_samples_per_s: float = Field(description="BNSERVE_DRIFT_MAX_SAMPLES_PER_S; 0 = no cap")
    window_seconds: float = Field(description="BNSERVE_DRIFT_WINDOW")
    history_windows: int = Field(description="BNSERVE_DRIFT_HISTORY: closed windows kept")
    sampled_requests: int = Field(description="requests sampled since the version loaded")
    dropped_requests: int = Field(
        description="sampled requests dropped because the monitor's queue was full"
    )
    max_cpu: float = Field(description="BNSERVE_DRIFT_MAX_CPU: CPU budget, share of one core")
    skipped_requests: int = Field(
        description="sampled requests skipped because the monitor was over its CPU budget"
    )
    pending_samples: int = Field(description="samples queued, not yet merged")
    monitor_seconds: float = Field(description="thread time spent computing statistics")


class LiveDriftResponse(BaseModel):
    model_name: str
    model_version: str
    monitor: LiveMonitorStatus
    current: LiveWindow
    history: list[LiveWindow] = Field(description="closed windows, oldest first")


class LiveResetResponse(BaseModel):
    model_name: str
    model_version: str
    window_start: datetime
