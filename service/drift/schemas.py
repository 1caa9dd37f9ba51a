"""The stat-drift response: the API contract, documented in OpenAPI."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..protocol.schemas import ResponseOutput

Verdict = Literal["ok", "warn", "drift"]


class OutputComparison(BaseModel):
    name: str
    max_abs_diff: float = Field(description="max |batch-statistics - global-statistics output|")
    mean_abs_diff: float
    relative_l2: float = Field(description="||batch - global||_2 / ||global||_2")
    argmax_agreement: float | None = Field(
        default=None, description="share of samples whose argmax agrees (2-D outputs only)"
    )


class ChannelValue(BaseModel):
    channel: int
    value: float


class PathStatistics(BaseModel):
    """How the per-channel statistics of a BN layer's input on one path compare with the
    layer's stored running statistics (mu_r, var_r)."""

    mean_shift_mean: float = Field(
        description="|mu - mu_r| / sqrt(var_r + eps), averaged over channels (in running stds)"
    )
    mean_shift_max: float
    worst_channels: list[ChannelValue] = Field(description="the channels with the largest shift")
    log_var_ratio_mean: float = Field(
        description="log((var + eps) / (var_r + eps)) averaged over channels; 0 = same spread"
    )
    log_var_ratio_max_abs: float
    wasserstein_mean: float = Field(
        description="Gaussian 2-Wasserstein distance per channel, sqrt((mu - mu_r)^2 + "
        "(sigma - sigma_r)^2) / sqrt(var_r + eps), averaged over channels"
    )
    wasserstein_max: float
    mean: list[float] | None = Field(default=None, description="per channel (return_statistics)")
    var: list[float] | None = Field(default=None, description="biased, per channel")


class LayerDrift(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str = Field(description="PyTorch module path from model.json")
    onnx_node: str
    channels: int
    values_per_channel: int = Field(description="batch x spatial positions behind each statistic")
    score: float = Field(description="wasserstein_mean on the global path: what serving sees")
    noise_floor: float = Field(
        description="the score sampling alone gives a matching batch: sqrt(1.5 / values)"
    )
    verdict: Verdict = Field(description="from score - noise_floor against the thresholds")
    global_path: PathStatistics = Field(
        alias="global", description="the served eval path: upstream BNs use running stats"
    )
    batch_path: PathStatistics = Field(
        alias="batch", description="the train-mode path: every upstream BN used batch stats"
    )
    running_mean: list[float] | None = None
    running_var: list[float] | None = None


class DriftSummary(BaseModel):
    verdict: Verdict
    score: float = Field(description="the largest layer score")
    most_drifted: list[str] = Field(description="up to three layers, largest score first")
    drifted_layers: list[str] = Field(description="every layer whose verdict is drift, in order")
    thresholds: dict[str, float]
    explanation: str


class StatDriftResponse(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    model_name: str
    model_version: str
    id: str | None = None
    batch_size: int
    summary: DriftSummary
    outputs: list[OutputComparison]
    layers: list[LayerDrift]
    global_outputs: list[ResponseOutput] | None = Field(
        default=None, description="with parameters.return_outputs: the eval (served) outputs"
    )
    batch_outputs: list[ResponseOutput] | None = Field(
        default=None, description="with parameters.return_outputs: the train-mode outputs"
    )
