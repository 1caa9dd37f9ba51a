"""The data plane's requests and responses: plain typed objects holding numpy arrays, the same
whichever protocol (REST JSON, REST binary, gRPC) carried them. Protocol codecs build and read
them; nothing here knows about HTTP or protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..protocol.datatypes import NUMPY_TO_V2


@dataclass(slots=True)
class InputTensor:
    """One input as sent: either `raw` little-endian bytes (the binary extension, gRPC's
    raw_input_contents; a view of the wire buffer, not a copy) or `data` elements (JSON, gRPC's
    typed contents), checked against the model by the data plane."""

    name: str
    datatype: str
    shape: list[int]
    raw: memoryview | bytes | None = None
    data: Any = None


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary: bool = False  # REST: in the binary part; gRPC always answers raw bytes
    classification: int = 0  # top-k "value:index[:label]" strings instead of the tensor


@dataclass(slots=True)
class InferRequest:
    model_name: str
    model_version: str | None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None = None  # None: every output of the model
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    default_binary: bool = False  # REST binary_data_output, for outputs not listed


@dataclass(slots=True)
class ValidatedRequest:
    """A request checked against one model version: arrays ready for session.run."""

    request: InferRequest
    tensors: dict[str, np.ndarray]
    outputs: list[RequestedOutput]
    batch_size: int


@dataclass(slots=True)
class OutputTensor:
    name: str
    array: np.ndarray
    binary: bool = False

    @property
    def datatype(self) -> str:
        return NUMPY_TO_V2[self.array.dtype]


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    id: str | None
    outputs: list[OutputTensor]
