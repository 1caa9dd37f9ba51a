"""Checking a request against a model version's signature and building its input arrays.

Protocol-independent: REST (JSON and binary) and gRPC (typed contents and raw bytes) requests
arrive here as InputTensor lists, so every protocol gives the same error for the same mistake.
Binary data becomes a numpy view of the wire bytes (no copy) wherever the byte order allows.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import BadRequest
from ..protocol.datatypes import element_size, numpy_dtype
from ..protocol.schemas import TensorMetadata
from .types import InferRequest, RequestedOutput, ValidatedRequest


def validate(
    request: InferRequest,
    inputs: Sequence[TensorMetadata],
    outputs: Sequence[TensorMetadata],
    *,
    max_elements: int,
    reject_nonfinite: bool,
) -> ValidatedRequest:
    expected = {spec.name: spec for spec in inputs}
    tensors: dict[str, np.ndarray] = {}
    for item in request.inputs:
        if item.name not in expected:
            raise BadRequest(f"unknown input '{item.name}'; expected {_names(expected)}")
        if item.name in tensors:
            raise BadRequest(f"input '{item.name}' is given twice; expected it once")
        spec = expected[item.name]
        _check_signature(item.name, item.datatype, item.shape, spec)
        count = math.prod(item.shape)
        if count > max_elements:
            raise BadRequest(
                f"input '{item.name}' has shape {item.shape} = {count} elements; expected at "
                f"most {max_elements} (the request size limit)"
            )
        if item.raw is not None:
            array = from_binary(item.name, item.raw, item.datatype, count)
        elif item.data is None:
            raise BadRequest(
                f"input '{item.name}' has neither data nor binary_data_size; expected one"
            )
        elif not isinstance(item.data, list | np.ndarray):
            raise BadRequest(
                f"input '{item.name}' data is a {type(item.data).__name__}; expected an array"
            )
        else:
            array = from_json(item.name, item.data, item.datatype, count)
        array = array.reshape(item.shape)
        if reject_nonfinite and array.dtype.kind == "f" and not np.isfinite(array).all():
            raise BadRequest(
                f"input '{item.name}' contains NaN or Inf; expected finite values "
                "(set BNSERVE_REJECT_NONFINITE=false to allow them)"
            )
        tensors[item.name] = array
    if len(tensors) != len(expected):
        missing = [name for name in expected if name not in tensors]
        raise BadRequest(f"missing input(s) {missing}; expected {_names(expected)}")
    batch_sizes = {a.shape[0] for a in tensors.values() if a.ndim}
    if len(batch_sizes) > 1:
        raise BadRequest(f"inputs have batch sizes {sorted(batch_sizes)}; expected one")
    if 0 in batch_sizes:  # nothing to run, and no batch statistics of zero samples
        raise BadRequest("inputs have batch size 0; expected at least 1 sample")
    return ValidatedRequest(
        request=request,
        tensors=tensors,
        outputs=_requested_outputs(request, outputs),
        batch_size=batch_sizes.pop() if batch_sizes else 1,
    )


def _names(specs: Mapping[str, TensorMetadata]) -> str:
    return "one of [" + ", ".join(f"'{n}'" for n in specs) + "]"


def _check_signature(name: str, datatype: str, shape: list[int], spec: TensorMetadata) -> None:
    if datatype != spec.datatype:
        raise BadRequest(f"input '{name}' has datatype {datatype}; expected {spec.datatype}")
    fits = len(shape) == len(spec.shape)
    if fits:
        for d, e in zip(shape, spec.shape, strict=True):  # a loop: no generator per request
            if d < 0 or (e >= 0 and d != e):
                fits = False
                break
    if not fits:
        raise BadRequest(f"input '{name}' has shape {shape}; expected {spec.shape} (-1: any size)")


def from_binary(name: str, raw: memoryview | bytes, datatype: str, count: int) -> np.ndarray:
    """Little-endian bytes as an array: a view of `raw` (no copy) on little-endian hosts."""
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


def _bytes_from_binary(name: str, raw: memoryview | bytes, count: int) -> np.ndarray:
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


def from_json(name: str, data: list | np.ndarray, datatype: str, count: int) -> np.ndarray:
    """`data` is nested lists, or a flat array already parsed (of the declared datatype's kind,
    exact): JSON's fast path, gRPC's typed contents."""
    if datatype == "BF16":
        raise BadRequest(f"input '{name}' is BF16, which must be sent as binary data")
    if datatype == "BYTES":
        array = np.array(data, dtype=np.object_)
        flat = array.reshape(-1)
        if array.size != count or not all(isinstance(v, str | bytes) for v in flat):
            raise BadRequest(f"input '{name}' data must be {count} strings for BYTES")
        return np.array([v.encode() if isinstance(v, str) else v for v in flat], np.object_)
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
    request: InferRequest, outputs: Sequence[TensorMetadata]
) -> list[RequestedOutput]:
    if request.outputs is None:
        return [RequestedOutput(spec.name, request.default_binary) for spec in outputs]
    known = {spec.name: spec for spec in outputs}
    for item in request.outputs:
        if item.name not in known:
            raise BadRequest(f"unknown output '{item.name}'; expected {_names(known)}")
    return request.outputs
