"""The REST codec: v2 JSON and binary-tensor bodies to the data plane's typed requests, and its
typed responses back to bodies.

Binary tensor data extension: the body is the JSON header (its byte length in the
Inference-Header-Content-Length HTTP header) followed by each binary tensor in the order of the
inputs that carry a `binary_data_size` parameter; each becomes a memoryview of the body, not a
copy. Responses use the same layout for outputs requested with `binary_data: true` (or all
outputs, with `binary_data_output: true`).
"""

from __future__ import annotations

import struct

import numpy as np
import orjson
from pydantic import ValidationError

from ..dataplane.types import InferRequest, InferResponse, InputTensor, RequestedOutput
from ..errors import BadRequest
from . import json_tensors
from .datatypes import NUMPY_TO_V2
from .schemas import InferenceRequest

HEADER_LENGTH = "inference-header-content-length"
JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def parse_request(body: bytes, header_length: str | None) -> tuple[InferenceRequest, memoryview]:
    """Split and parse the body into the validated JSON header and the binary part."""
    view = memoryview(body)
    if header_length is None:
        json_part, binary = view, view[len(view) :]
    else:
        try:
            size = int(header_length)
        except ValueError:
            raise BadRequest(
                f"Inference-Header-Content-Length is {header_length!r}; expected an integer"
            ) from None
        if size < 1 or size > len(body):
            raise BadRequest(
                f"Inference-Header-Content-Length is {size} but the body has {len(body)} bytes; "
                "expected the length of the JSON header, at most the body length"
            )
        json_part, binary = view[:size], view[size:]
    try:
        document = json_tensors.loads(json_part)
    except json_tensors.InvalidJSON as exc:
        raise BadRequest(f"request body is not valid JSON ({exc}); expected a v2 request") from None
    if not isinstance(document, dict):
        raise BadRequest(f"request body is a JSON {type(document).__name__}; expected an object")
    try:
        return InferenceRequest.model_validate(document), binary
    except ValidationError as exc:
        raise BadRequest(describe_validation_error(exc)) from None


def requested_output(
    name: str, binary: bool, top_k: object, expected: str = "a positive integer"
) -> RequestedOutput:
    """An output the request names, its classification top-k checked (0: none); REST's and
    gRPC's codecs give the same error, `expected` saying how their protocol carries it."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise BadRequest(f"output '{name}' has classification {top_k!r}; expected {expected}")
    return RequestedOutput(name, binary, top_k)


def decode_request(
    model_name: str, model_version: str | None, body: bytes, header_length: str | None
) -> InferRequest:
    """A REST body as the data plane's request: binary tensors as views of `body`."""
    parsed, binary = parse_request(body, header_length)
    inputs, offset = [], 0
    for item in parsed.inputs:
        size = _binary_size(item.name, item.parameters)
        raw = None
        if size is not None:
            if item.data is not None:
                raise BadRequest(
                    f"input '{item.name}' has both binary_data_size and JSON data; expected one"
                )
            if offset + size > len(binary):
                raise BadRequest(
                    f"input '{item.name}' needs {size} bytes of binary data at offset {offset} "
                    f"but only {len(binary) - offset} remain; expected the full tensor after "
                    "the JSON header"
                )
            raw = binary[offset : offset + size]
            offset += size
        inputs.append(InputTensor(item.name, item.datatype, item.shape, raw, item.data))
    if offset != len(binary):
        raise BadRequest(
            f"{len(binary) - offset} bytes of binary data follow the tensors declared by "
            "binary_data_size; expected exactly the declared bytes"
        )
    default_binary = _flag(parsed.parameters, "binary_data_output", "request")
    outputs = None
    if parsed.outputs:
        outputs = []
        for item in parsed.outputs:
            binary_ = _flag(item.parameters, "binary_data", f"output '{item.name}'", default_binary)
            top_k = (item.parameters or {}).get("classification", 0)
            outputs.append(requested_output(item.name, binary_, top_k))
    return InferRequest(
        model_name=model_name,
        model_version=model_version,
        inputs=inputs,
        outputs=outputs,
        id=parsed.id,
        parameters=parsed.parameters or {},
        default_binary=default_binary,
    )


def describe_validation_error(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        problems.append(f"{where}: {error['msg']}")
    more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
    return "invalid request: " + "; ".join(problems) + more


def _binary_size(name: str, parameters: dict | None) -> int | None:
    if not parameters or "binary_data_size" not in parameters:
        return None
    size = parameters["binary_data_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise BadRequest(
            f"input '{name}' has binary_data_size {size!r}; expected a non-negative integer"
        )
    return size


def _flag(parameters: dict | None, key: str, where: str, default: bool = False) -> bool:
    value = (parameters or {}).get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{where} parameter {key} is {value!r}; expected true or false")
    return value


def encode_response(response: InferResponse) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (binary layout when any output is binary)."""
    header: dict = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id is not None:
        header["id"] = response.id
    entries, blobs = [], []
    for output in response.outputs:
        array = output.array
        entry: dict = {
            "name": output.name,
            "datatype": NUMPY_TO_V2[array.dtype],
            "shape": list(array.shape),
        }
        if output.binary:
            raw = bytes_to_binary(array) if array.dtype == object else array.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif array.dtype == object:
            entry["data"] = [_text(v) for v in array.reshape(-1)]
        else:
            entry["data"] = np.ascontiguousarray(array).reshape(-1)
        entries.append(entry)
    header["outputs"] = entries
    json_part = orjson.dumps(header, option=JSON_OPTIONS)
    if not blobs:
        return json_part, {"content-type": "application/json"}
    headers = {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(json_part)),
    }
    return b"".join([json_part, *blobs]), headers


def datatype_of(array: np.ndarray) -> str:
    return NUMPY_TO_V2[np.dtype(array.dtype)]


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def bytes_to_binary(array: np.ndarray) -> bytes:
    """BYTES elements as the binary extension lays them out: 4-byte LE length, then bytes."""
    parts = []
    for value in array.reshape(-1):
        raw = value if isinstance(value, bytes) else str(value).encode()
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)
