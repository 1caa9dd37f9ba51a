"""The model card (model.json) and the export report: the export side of the repository contract.

models/README.md documents the format; the service reads it with its own schema and never
imports this module.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .fold import REMOVED_BY

CARD_FORMAT = "bnserve.model-card/1"

Statistics = Literal["running", "recalibrated", "calibrated", "instance"]
ParityRule = Literal["fixed", "conditioning", "override"]

# How each BN left the graph: the fold-rule table's names, plus the layers exported to
# normalize each sample with its own statistics (batch_stats="instance"), which no rule folds.
RemovedBy = Literal[(*REMOVED_BY, "per_sample_normalization")]


class TensorSpec(BaseModel):
    name: str
    datatype: str = Field(description="KServe v2 datatype, e.g. FP32")
    shape: list[int] = Field(description="-1 for dynamic dimensions; axis 0 is the batch")
    labels: list[str] | None = Field(default=None, description="class names along the last axis")


class BatchNormLayer(BaseModel):
    name: str = Field(description="PyTorch module path (e.g. layer1.0.bn1) or ONNX-derived name")
    onnx_node: str = Field(description="the BatchNormalization node in reference.onnx")
    channels: int
    eps: float
    momentum: float | None = Field(description="PyTorch convention; None for cumulative average")
    num_batches_tracked: int | None = None
    track_running_stats: bool | None = None
    affine: bool | None = None
    statistics: Statistics = Field(
        description="running: stored stats; recalibrated/calibrated: exact population stats "
        "computed at export; instance: each sample normalized with its own stats"
    )
    removed_by: RemovedBy = Field(description="the fold rule that removed it (models/README.md)")
    folded_into: str | None = Field(default=None, description="ONNX node that absorbed it")
    note: str | None = Field(default=None, description="why a weaker rewrite was needed")


class AffineFoldRecord(BaseModel):
    node: str
    op_type: str
    into: str


class ConstantFoldRecord(BaseModel):
    tensor: str = Field(description="the tensor of reference.onnx, now an initializer")
    nodes: int = Field(description="how many nodes of reference.onnx computed it")
    op_types: list[str]
    read_by: list[str] = Field(description="the reference.onnx nodes that read it")


class Verification(BaseModel):
    oracle: Literal["pytorch-eval", "reference.onnx"]
    samples: int
    parity_max_abs_error: float
    parity_rel_error: float = Field(description="max |onnx - oracle| / max |oracle|")
    reference_rel_error: float | None = Field(
        default=None, description="reference.onnx against the PyTorch oracle, same measure"
    )
    float64_rel_error: float | None = Field(
        default=None,
        description="model.onnx against the PyTorch oracle run in float64 (a float64 copy of "
        "the model); the measure the parity limit applies to when present",
    )
    source_float32_rel_error: float | None = Field(
        default=None,
        description="PyTorch float32 eval against float64: the model's own float32 conditioning",
    )
    reference_float64_rel_error: float | None = Field(
        default=None, description="reference.onnx against the float64 oracle"
    )
    parity_rule: ParityRule = Field(
        default="fixed",
        description="fixed: 1e-4 (float32); conditioning: conditioning_factor x "
        "source_float32_rel_error, above 1e-4; override: parity_tolerance given at export",
    )
    parity_tolerance_override: float | None = Field(
        default=None, description="the parity_tolerance the exporter asked for, if any"
    )
    batch_independence_rel_error: float = Field(
        description="max |sample alone - sample in batch| / max |output| over checked samples"
    )
    batch_independence_bitwise: bool
    batch_norm_nodes_left: int
    source_model_untouched: bool | None = Field(
        default=None, description="the caller's training flags and state_dict, bit for bit"
    )
    tolerances: dict[str, float]
    execution_provider: str


class FileRecord(BaseModel):
    sha256: str
    bytes: int


class ChannelStatistics(BaseModel):
    mean: list[float]
    var: list[float] = Field(description="biased (population) variance")


class RecalibratedLayer(BaseModel):
    name: str
    onnx_node: str
    channels: int
    values_per_channel: int | None = Field(
        description="captured values each channel pools (samples x positions); None if unknown"
    )
    mean_shift: float = Field(
        description="RMS over channels of (mean_after - mean_before) / sqrt(var_before + eps)"
    )
    log_var_ratio: float = Field(
        description="RMS over channels of ln((var_after + eps) / (var_before + eps))"
    )
    before: ChannelStatistics | None = Field(
        default=None, description="per channel; in statistics_file instead for large models"
    )
    after: ChannelStatistics | None = None


class CaptureRecord(BaseModel):
    capture_id: str
    model: str
    version: str
    started: str
    stopped: str | None
    stop_reason: str | None = None
    samples: int


class Recalibration(BaseModel):
    """Provenance of a version made by `python -m export recalibrate`."""

    parent_version: int
    method: Literal["onnxruntime", "pytorch"] = Field(
        description="onnxruntime: measured through the parent's reference.onnx; pytorch: "
        "through the factory + weights (export_model(recalibrate=True))"
    )
    capture: CaptureRecord
    layers: list[RecalibratedLayer]
    statistics_file: str | None = Field(
        default=None,
        description="sidecar with per-channel before/after when model.json would grow too large",
    )


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["bnserve.model-card/1"] = CARD_FORMAT
    name: str
    version: int
    created: str = Field(description="UTC, ISO 8601")
    description: str | None = None
    source: Literal["pytorch", "onnx"]
    producer: dict[str, str] = Field(description="versions of the tools that made this entry")
    opset: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    batch_norm: list[BatchNormLayer]
    affine_folds: list[AffineFoldRecord] = []
    constant_folds: list[ConstantFoldRecord] = Field(
        default=[],
        description="tensors computed from constants alone (a standardized weight, shape "
        "arithmetic), evaluated in float64 at export; a bare Constant node is not listed",
    )
    verification: Verification
    files: dict[str, FileRecord]
    samples: list[str] = Field(default=[], description="v2 request bodies under samples/")
    serving: dict[str, object] | None = Field(
        default=None, description="optional service settings such as dynamic batching"
    )
    recalibration: Recalibration | None = Field(
        default=None, description="set on versions made by `python -m export recalibrate`"
    )


class ExportTimings(BaseModel):
    """Seconds per export step (not in model.json: they describe the run, not the model)."""

    oracle: float = Field(0.0, description="PyTorch eval forward, float32 and float64")
    torch_export: float = Field(0.0, description="torch.onnx export to reference.onnx")
    fold: float = 0.0
    verify: float = Field(0.0, description="ONNX Runtime runs of model.onnx and reference.onnx")
    write: float = 0.0


class ExportReport(ModelCard):
    """What `export_model`/`fold_onnx` did: the card as written, plus where and any warnings."""

    model_config = ConfigDict(extra="forbid")

    path: str
    warnings: list[str] = []
    seconds: float
    timings: ExportTimings = Field(default_factory=ExportTimings)

    @property
    def layers(self) -> list[BatchNormLayer]:
        return self.batch_norm

    def card(self) -> ModelCard:
        return ModelCard.model_validate(self.model_dump(include=set(ModelCard.model_fields)))
