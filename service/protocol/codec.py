"""Request decoding and response encoding for v2 REST, JSON and binary tensor data.

Binary tensor data extension: the body is the JSON header (its byte length in the
Inference-Header-Content-Length HTTP header) followed by each binary tensor in the order of the
inputs that carry a `binary_data_size` parameter. Responses use the same layout for outputs
requested with `binary_data: true` (or all outputs, with `binary_data_output: true`).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import orjson
from pydantic import ValidationError

from ..errors import BadRequest
from . import json_tensors
from .datatypes import NUMPY_TO_V2, element_size, numpy_dtype
from .schemas import InferenceRequest, TensorMetadata

HEADER_LENGTH = "inference-header-content-length"
JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


@dataclass
class RequestedOutput:
    name: str
    binary: bool
    classification: int = 0


@dataclass
class DecodedRequest:
    request: InferenceRequest
    tensors: dict[str, np.ndarray]
    outputs: list[RequestedOutput]
    batch_size: int


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


def describe_validation_error(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        problems.append(f"{where}: {error['msg']}")
    more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
    return "invalid request: " + "; ".join(problems) + more


def decode_request(
    request: InferenceRequest,
    binary: memoryview,
    inputs: Sequence[TensorMetadata],
    outputs: Sequence[TensorMetadata],
    *,
    max_elements: int,
    reject_nonfinite: bool,
) -> DecodedRequest:
    """Validate the request against the model's inputs and outputs; build the input arrays."""
    expected = {spec.name: spec for spec in inputs}
    seen: set[str] = set()
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for item in request.inputs:
        if item.name not in expected:
            raise BadRequest(f"unknown input '{item.name}'; expected {_names(expected)}")
        if item.name in seen:
            raise BadRequest(f"input '{item.name}' is given twice; expected it once")
        seen.add(item.name)
        spec = expected[item.name]
        _check_signature(item.name, item.datatype, item.shape, spec)
        count = math.prod(item.shape)
        if count > max_elements:
            raise BadRequest(
                f"input '{item.name}' has shape {item.shape} = {count} elements; expected at "
                f"most {max_elements} (the request size limit)"
            )
        size = _binary_size(item.name, item.parameters)
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
            array = _from_binary(item.name, binary[offset : offset + size], item.datatype, count)
            offset += size
        elif item.data is None:
            raise BadRequest(
                f"input '{item.name}' has neither data nor binary_data_size; expected one"
            )
        elif not isinstance(item.data, list | np.ndarray):
            raise BadRequest(
                f"input '{item.name}' data is a {type(item.data).__name__}; expected an array"
            )
        else:
            array = _from_json(item.name, item.data, item.datatype, count)
        array = array.reshape(item.shape)
        if reject_nonfinite and array.dtype.kind == "f" and not np.isfinite(array).all():
            raise BadRequest(
                f"input '{item.name}' contains NaN or Inf; expected finite values "
                "(set BNSERVE_REJECT_NONFINITE=false to allow them)"
            )
        tensors[item.name] = array
    missing = [name for name in expected if name not in seen]
    if missing:
        raise BadRequest(f"missing input(s) {missing}; expected {_names(expected)}")
    if offset != len(binary):
        raise BadRequest(
            f"{len(binary) - offset} bytes of binary data follow the tensors declared by "
            "binary_data_size; expected exactly the declared bytes"
        )
    batch_sizes = {a.shape[0] for a in tensors.values() if a.ndim}
    if len(batch_sizes) > 1:
        raise BadRequest(f"inputs have batch sizes {sorted(batch_sizes)}; expected one")
    batch = batch_sizes.pop() if batch_sizes else 1
    return DecodedRequest(
        request=request,
        tensors=tensors,
        outputs=_requested_outputs(request, outputs),
        batch_size=batch,
    )


def _names(specs: Mapping[str, TensorMetadata]) -> str:
    return "one of [" + ", ".join(f"'{n}'" for n in specs) + "]"


def _check_signature(name: str, datatype: str, shape: list[int], spec: TensorMetadata) -> None:
    if datatype != spec.datatype:
        raise BadRequest(f"input '{name}' has datatype {datatype}; expected {spec.datatype}")
    fits = len(shape) == len(spec.shape) and all(
        d >= 0 and (e < 0 or d == e) for d, e in zip(shape, spec.shape, strict=True)
    )
    if not fits:
        raise BadRequest(f"input '{name}' has shape {shape}; expected {spec.shape} (-1: any size)")


def _binary_size(name: str, parameters: dict | None) -> int | None:
    if not parameters or "binary_data_size" not in parameters:
        return None
    size = parameters["binary_data_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise BadRequest(
            f"input '{name}' has binary_data_size {size!r}; expected a non-negative integer"
        )
    return size


def _from_binary(name: str, raw: memoryview, datatype: str, count: int) -> np.ndarray:
    if datatype == "BYTES":
        return _bytes_from_binary(name, raw, count)
    if datatype == "BF16":
        raise BadRequest(f"input '{name}' is BF16, which this server does not accept")
    width = element_size(datatype)
    if len(raw) != count * width:
        raise BadRequest(
            f"input '{name}' has {len(raw)} bytes of binary data; expected {count * width} "
            f"({count} {datatype} elements of {width} bytes)"
        )
    return np.frombuffer(raw, dtype=numpy_dtype(datatype).newbyteorder("<"), count=count).astype(
        numpy_dtype(datatype), copy=False
    )


def _bytes_from_binary(name: str, raw: memoryview, count: int) -> np.ndarray:
    items, position = [], 0
    while position < len(raw):
        if position + 4 > len(raw):
            break
        (length,) = struct.unpack_from("<I", raw, position)
        position += 4
        if position + length > len(raw):
            break
        items.append(bytes(raw[position : position + length]))
        position += length
    if position != len(raw) or len(items) != count:
        raise BadRequest(
            f"input '{name}' binary BYTES data does not hold {count} length-prefixed elements; "
            "expected 4-byte little-endian lengths each followed by that many bytes"
        )
    return np.array(items, dtype=np.object_)


_KINDS = {"f": "iuf", "i": "iu", "u": "iu", "b": "b"}


def _from_json(name: str, data: list | np.ndarray, datatype: str, count: int) -> np.ndarray:
    """`data` is nested lists, or a flat array that json_tensors already parsed (of the
    declared datatype's kind, exact)."""
    if datatype == "BF16":
        raise BadRequest(f"input '{name}' is BF16, which must be sent as binary data")
    if datatype == "BYTES":
        array = np.array(data, dtype=np.object_)
        if array.size != count or not all(isinstance(v, str) for v in array.reshape(-1)):
            raise BadRequest(f"input '{name}' data must be {count} strings for BYTES")
        return np.array([v.encode() for v in array.reshape(-1)], dtype=np.object_)
    target = numpy_dtype(datatype)
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, RecursionError):
        raise BadRequest(
            f"input '{name}' data is not a rectangular array; expected {count} {datatype} "
            "numbers, flat or nested to the input's shape"
        ) from None
    if array.dtype.kind not in _KINDS[target.kind] and array.size:
        raise BadRequest(
            f"input '{name}' data holds {_describe_kind(array.dtype)}; expected {datatype} numbers"
        )
    if array.size != count:
        raise BadRequest(
            f"input '{name}' data has {array.size} elements; expected {count} for its shape"
        )
    if target.kind in "iu" and array.size:
        info = np.iinfo(target)
        if array.min() < info.min or array.max() > info.max:
            raise BadRequest(
                f"input '{name}' data has values outside the {datatype} range "
                f"[{info.min}, {info.max}]"
            )
    with np.errstate(over="ignore"):  # out of FP16 range: inf, refused as non-finite later
        return array.astype(target, copy=False).reshape(-1)


def _describe_kind(dtype: np.dtype) -> str:
    return {
        "b": "booleans",
        "U": "strings",
        "S": "strings",
        "O": "mixed or non-numeric values",
        "f": "non-integer numbers",
    }.get(dtype.kind, str(dtype))


def _requested_outputs(
    request: InferenceRequest, outputs: Sequence[TensorMetadata]
) -> list[RequestedOutput]:
    known = {spec.name: spec for spec in outputs}
    default_binary = _flag(request.parameters, "binary_data_output", "request")
    if not request.outputs:
        return [RequestedOutput(name=name, binary=default_binary) for name in known]
    requested = []
    for item in request.outputs:
        if item.name not in known:
            raise BadRequest(f"unknown output '{item.name}'; expected {_names(known)}")
        binary = _flag(item.parameters, "binary_data", f"output '{item.name}'", default_binary)
        top_k = (item.parameters or {}).get("classification", 0)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise BadRequest(
                f"output '{item.name}' has classification {top_k!r}; expected a positive integer"
            )
        requested.append(RequestedOutput(name=item.name, binary=binary, classification=top_k))
    return requested


def _flag(parameters: dict | None, key: str, where: str, default: bool = False) -> bool:
    value = (parameters or {}).get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{where} parameter {key} is {value!r}; expected true or false")
    return value


def encode_response(
    *,
    model_name: str,
    model_version: str,
    request_id: str | None,
    results: Mapping[str, np.ndarray],
    requested: Sequence[RequestedOutput],
    labels: Mapping[str, list[str] | None],
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (binary layout when any output is binary)."""
    header: dict = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        header["id"] = request_id
    entries, blobs = [], []
    for spec in requested:
        array = results[spec.name]
        if spec.classification:
            array = classify(array, spec.classification, labels.get(spec.name))
        entry: dict = {
            "name": spec.name,
            "datatype": datatype_of(array),
            "shape": list(array.shape),
        }
        if spec.binary:
            raw = _bytes_to_binary(array) if array.dtype == object else array.tobytes()
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


def classify(scores: np.ndarray, top_k: int, labels: list[str] | None) -> np.ndarray:
    """Triton's classification extension: top-k "value:index[:label]" strings per sample."""
    if scores.ndim < 1 or scores.dtype == object:
        raise BadRequest("classification needs a numeric output with classes on the last axis")
    flat = scores.reshape(scores.shape[0] if scores.ndim > 1 else 1, -1)
    k = min(top_k, flat.shape[1])
    order = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    rows = []
    for row, indices in zip(flat, order, strict=True):
        cells = []
        for index in indices:
            label = f":{labels[index]}" if labels and index < len(labels) else ""
            cells.append(f"{float(row[index]):f}:{int(index)}{label}".encode())
        rows.append(cells)
    return np.array(rows, dtype=np.object_).reshape((*scores.shape[:-1], k))


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _bytes_to_binary(array: np.ndarray) -> bytes:
    parts = []
    for value in array.reshape(-1):
        raw = value if isinstance(value, bytes) else str(value).encode()
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)
