"""The service's reading of model.json (see models/README.md). Tolerant of fields it does not
use, strict about the ones it does; it shares no code with the exporter."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .protocol.schemas import TensorMetadata


class FileCard(BaseModel):
    model_config = ConfigDict(extra="ignore")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class BatchNormCard(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    onnx_node: str = ""
    channels: int
    eps: float
    momentum: float | None = None
    num_batches_tracked: int | None = None
    statistics: str = "running"
    removed_by: str = ""


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: str
    name: str
    version: int = Field(ge=1)
    created: str = ""
    description: str | None = None
    source: str = ""
    producer: dict[str, str] = {}
    inputs: list[TensorMetadata] = Field(min_length=1)
    outputs: list[TensorMetadata] = Field(min_length=1)
    batch_norm: list[BatchNormCard] = []
    verification: dict[str, Any] = {}
    files: dict[str, FileCard] = {}
    samples: list[str] = []
    serving: dict[str, Any] | None = None

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if not value.startswith("bnserve.model-card/1"):
            raise ValueError(f"unknown model card format {value!r}; expected bnserve.model-card/1")
        return value

    def labels(self) -> dict[str, list[str] | None]:
        return {o.name: o.labels for o in self.outputs}
