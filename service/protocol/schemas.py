"""Pydantic schemas of the v2 REST API: the documented contract (OpenAPI) and request parsing.

Tensor data is typed loosely here (any JSON array) and checked against the model by the codec,
so a wrong element type gets an error that names the input and the expected datatype.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

Parameters = dict[str, Any]
# Checked by the codec against the model, not element by element here: a 224x224x3 image is
# 150k numbers and per-element validation would cost more than parsing them.
TensorData = Annotated[Any, WithJsonSchema({"type": "array", "items": {}})]
Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BF16", "BYTES",
]  # fmt: skip


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=256)
    shape: list[int] = Field(max_length=16, description="full shape, batch axis first")
    datatype: Datatype
    parameters: Parameters | None = Field(
        default=None, description="binary_data_size: bytes of this tensor in the binary part"
    )
    data: TensorData | None = Field(
        default=None, description="row-major elements, flat or nested; omitted when binary"
    )


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=256)
    parameters: Parameters | None = Field(
        default=None, description="binary_data: bool; classification: top-k as BYTES"
    )


class InferenceRequest(BaseModel):
    """A v2 inference request. With the binary tensor data extension the body is this JSON
    (its length in the Inference-Header-Content-Length header) followed by raw tensors."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = Field(default=None, max_length=256)
    parameters: Parameters | None = Field(
        default=None, description="binary_data_output: bool (all outputs binary)"
    )
    inputs: list[RequestInput] = Field(min_length=1, max_length=64)
    outputs: list[RequestOutput] | None = Field(default=None, max_length=64)


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: Datatype
    parameters: Parameters | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong and what was expected")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class LiveResponse(BaseModel):
    live: bool


class ReadyResponse(BaseModel):
    ready: bool


class ModelReadyResponse(BaseModel):
    name: str
    version: str | None = None
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: Datatype
    shape: list[int]
    labels: list[str] | None = None


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: Parameters = Field(
        default_factory=dict,
        description="bnserve: execution_provider, state, batch_norm layers, verification",
    )


class RepositoryIndexRequest(BaseModel):
    ready: bool = False


class RepositoryModel(BaseModel):
    name: str
    version: str | None = None
    state: Literal["READY", "LOADING", "UNAVAILABLE", "UNLOADING"]
    reason: str = ""


class RepositoryLoadRequest(BaseModel):
    parameters: Parameters | None = None


class TritonTensorConfig(BaseModel):
    name: str
    data_type: str = Field(description="Triton's TYPE_* name")
    dims: list[int] = Field(description="without the batch axis when max_batch_size > 0")


class TritonDynamicBatching(BaseModel):
    preferred_batch_size: list[int] = []
    max_queue_delay_microseconds: int = 0


class TritonModelConfig(BaseModel):
    """The part of Triton's model configuration a served ONNX model fills in."""

    name: str
    platform: str = "onnxruntime_onnx"
    backend: str = "onnxruntime"
    max_batch_size: int = Field(
        description="> 0 when the batch axis is dynamic: the largest batch one request may carry"
    )
    input: list[TritonTensorConfig]
    output: list[TritonTensorConfig]
    dynamic_batching: TritonDynamicBatching | None = None


class StatisticDuration(BaseModel):
    count: int = 0
    ns: int = 0


class InferStatistics(BaseModel):
    success: StatisticDuration
    fail: StatisticDuration
    queue: StatisticDuration
    compute_input: StatisticDuration
    compute_infer: StatisticDuration
    compute_output: StatisticDuration
    cache_hit: StatisticDuration
    cache_miss: StatisticDuration


class InferBatchStatistics(BaseModel):
    batch_size: int
    compute_input: StatisticDuration
    compute_infer: StatisticDuration
    compute_output: StatisticDuration


class ModelStatistics(BaseModel):
    """Triton's statistics extension, per model version."""

    name: str
    version: str
    last_inference: int = Field(description="ms since the epoch of the last success")
    inference_count: int = Field(description="samples inferred (a batch of 4 counts 4)")
    execution_count: int = Field(description="model runs (dynamic batching merges requests)")
    inference_stats: InferStatistics
    batch_stats: list[InferBatchStatistics]


class ModelStatisticsResponse(BaseModel):
    model_stats: list[ModelStatistics]
