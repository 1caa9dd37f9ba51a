"""Service settings: command-line flags, or environment variables prefixed BNSERVE_."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BNSERVE_", extra="ignore")

    repository: Path = Field(Path("models"), description="model repository (read-only is fine)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="gRPC (KServe v2 / Triton protocol) port; 0 = off"
    )
    providers: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: CUDA EP when it really runs, else CPU EP"
    )
    device_id: int = Field(0, ge=0, description="CUDA device for the CUDA EP")
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="ORT intra-op threads; 0 = one for models up to 1 MiB, else physical cores",
    )
    inference_threads: int = Field(
        1, ge=1, description="batches each model version runs at once, each on its own thread"
    )
    inline_run_us: int = Field(
        100,
        ge=0,
        description="models whose session.run takes less than this per sample (measured) run "
        "on the event loop when nothing is queued, skipping the thread hop; 0 = never",
    )
    version_policy: str = Field(
        "latest", description="latest | all | specific:1,3 — which versions each model serves"
    )
    poll_interval: float = Field(
        0.0, ge=0, description="seconds between repository polls for new versions; 0 = off"
    )
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="larger bodies: 413")
    request_timeout: float = Field(30.0, gt=0, description="seconds; slower requests get 504")
    max_queue_size: int = Field(256, ge=1, description="waiting requests per model before 503")
    max_concurrency: int = Field(64, ge=1, description="requests in flight across all models")
    max_batch_size: int = Field(0, ge=0, description="dynamic batching default; 0 = off")
    max_queue_delay_us: int = Field(500, ge=0, description="dynamic batching wait")
    reject_nonfinite: bool = Field(True, description="400 for NaN/Inf inputs")
    debug_endpoints: bool = Field(True, description="stat-drift endpoints; off = 404")
    debug_token: SecretStr | None = Field(None, description="bearer token for debug endpoints")
    admin_token: SecretStr | None = Field(None, description="bearer token for repository API")
    drift_warn: float = Field(
        0.25, gt=0, description="stat-drift: warn at this layer score (running std units)"
    )
    drift_alert: float = Field(0.5, gt=0, description="stat-drift: drift at this layer score")
    # -- live drift monitoring and traffic capture (issue 10) --
    # 0.5 %: one sampled ResNet-18 image costs the low-priority monitor ~60 ms of CPU, so at
    # this rate it uses under 1 % of a core (benchmarks.drift_cost); drift_max_cpu bounds it
    # whatever the traffic. A 60 s window of 50 requests/s still pools ~15 samples.
    drift_sample_rate: float = Field(
        0.005, ge=0, le=1, description="live drift: share of requests sampled; 0 = off"
    )
    drift_max_samples_per_s: float = Field(
        20.0, ge=0, description="live drift: cap on sampled samples per second; 0 = no cap"
    )
    # 2 % of one core: with the monitor at nice 19, its share of a saturated machine's
    # throughput is at most this over the core count, inside the 3 % target even on one core.
    drift_max_cpu: float = Field(
        0.02, ge=0, le=1,
        description="live drift: CPU budget of the monitor, share of one core; 0 = unbounded",
    )  # fmt: skip
    drift_window: float = Field(60.0, gt=0, description="live drift: seconds per window")
    drift_history: int = Field(30, ge=0, description="live drift: closed windows kept")
    capture_dir: Path | None = Field(
        None, description="traffic capture folder (stores request inputs); unset = off"
    )
    capture_max_samples: int = Field(10_000, ge=1, description="capture: default sample bound")
    capture_max_bytes: int = Field(
        1024**3, ge=1, description="capture: default bound on stored input bytes"
    )
    drain_delay: float = Field(
        2.0, ge=0, description="SIGTERM: seconds not-ready but still serving before closing"
    )
    graceful_timeout: float = Field(
        20.0, ge=0, description="SIGTERM: seconds to let accepted requests finish"
    )
    max_connections: int = Field(1024, ge=1, description="open connections before 503")
    http_fast_infer: bool = Field(
        True,
        description="answer plain POST .../infer in the HTTP protocol, without an ASGI request "
        "cycle (same answers, less per-request work); false: all through the ASGI app",
    )
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_queue_size: int = Field(
        4096, ge=1, description="log records waiting for the writer; past it they are dropped"
    )
