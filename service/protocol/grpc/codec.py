"""gRPC messages to and from the data plane's typed objects.

Tensors travel as raw little-endian bytes (raw_input_contents / raw_output_contents, what
tritonclient and perf_analyzer send) or as typed `contents`; both become the same InputTensor
as REST's binary and JSON data, so the data plane checks them the same way.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from google.protobuf import json_format

from ...dataplane.types import InferRequest, InferResponse, InputTensor
from ...errors import BadRequest
from ..codec import bytes_to_binary, requested_output
from . import bnserve_inference_pb2 as pb

# The typed contents field each datatype travels in (Triton's mapping).
CONTENTS = {
    "BOOL": ("bool_contents", np.bool_),
    "INT8": ("int_contents", np.int64),
    "INT16": ("int_contents", np.int64),
    "INT32": ("int_contents", np.int64),
    "INT64": ("int64_contents", np.int64),
    "UINT8": ("uint_contents", np.uint64),
    "UINT16": ("uint_contents", np.uint64),
    "UINT32": ("uint_contents", np.uint64),
    "UINT64": ("uint64_contents", np.uint64),
    "FP32": ("fp32_contents", np.float32),
    "FP64": ("fp64_contents", np.float64),
    "BYTES": ("bytes_contents", None),
}
CONTENT_FIELDS = tuple(f.name for f in pb.InferTensorContents.DESCRIPTOR.fields)


# raw_input_contents' key on the wire: its field number, wire type 2 (length-delimited).
RAW_KEY = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number << 3 | 2
# Top-level fields the Python walk follows; past this (a request of thousands of tiny fields
# would hold the event loop) protobuf's C parser takes the whole message.
MAX_WALKED_FIELDS = 1024


class InferMessage(NamedTuple):
    """A ModelInferRequest parsed without its raw_input_contents, and those as views of the
    received bytes: protobuf would copy each tensor twice (into the message, then into a
    bytes object on access)."""

    message: pb.ModelInferRequest
    raw: list[memoryview]

    @property
    def model_name(self) -> str:
        return self.message.model_name


def parse_infer(data: bytes) -> InferMessage:
    """Parse a ModelInferRequest as protobuf would, the tensor bytes left in place. The top
    level is walked for raw_input_contents entries and the other fields are parsed by protobuf
    (so they are checked as before); bytes the walk cannot follow are parsed whole, so
    protobuf reports them (DecodeError) exactly as it would without this."""
    spans = _top_level_fields(data)
    if spans is None:
        message = pb.ModelInferRequest.FromString(data)
        return InferMessage(message, [memoryview(r) for r in message.raw_input_contents])
    view = memoryview(data)
    raw, rest = [], []
    for key, start, value_start, end in spans:
        if key == RAW_KEY:
            raw.append(view[value_start:end])
        else:
            rest.append(view[start:end])
    if not raw:
        return InferMessage(pb.ModelInferRequest.FromString(data), raw)
    return InferMessage(pb.ModelInferRequest.FromString(b"".join(rest)), raw)


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[position]  # IndexError past the end: truncated
        result |= (byte & 0x7F) << shift
        position += 1
        if byte < 0x80:
            return result, position
        shift += 7
        if shift >= 64:
            raise ValueError("varint longer than 10 bytes")


def _top_level_fields(data: bytes) -> list[tuple[int, int, int, int]] | None:
    """(key, start, value start, end) of each top-level field; None where the wire format is
    not one this walk follows (groups, bad keys, truncation, too many fields)."""
    fields, position, size = [], 0, len(data)
    try:
        while position < size:
            start = position
            key, position = _varint(data, position)
            wire = key & 7
            if key >> 3 == 0 or key >> 32:
                return None
            if wire == 0:
                _, position = _varint(data, position)
                value_start = position
            elif wire == 2:
                length, value_start = _varint(data, position)
                position = value_start + length
            elif wire in (1, 5):
                value_start = position
                position += 8 if wire == 1 else 4
            else:
                return None
            if position > size:
                return None
            fields.append((key, start, value_start, position))
            if len(fields) > MAX_WALKED_FIELDS:
                return None
    except (IndexError, ValueError):
        return None
    return fields


def parameters(mapping) -> dict:
    """An InferParameter map as plain values."""
    out = {}
    for key, value in mapping.items():
        kind = value.WhichOneof("parameter_choice")
        out[key] = getattr(value, kind) if kind else None
    return out


def decode_infer(parsed: InferMessage) -> InferRequest:
    message, raw = parsed
    if raw and len(raw) != len(message.inputs):
        raise BadRequest(
            f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs; "
            "expected one per input, in the order of the inputs"
        )
    inputs = []
    for index, item in enumerate(message.inputs):
        shape = list(item.shape)
        if raw:
            if item.HasField("contents"):
                raise BadRequest(
                    f"input '{item.name}' has both contents and raw_input_contents; expected one"
                )
            inputs.append(InputTensor(item.name, item.datatype, shape, raw=raw[index]))
        else:
            inputs.append(InputTensor(item.name, item.datatype, shape, data=_contents(item)))
    outputs = None
    if message.outputs:
        outputs = []
        for item in message.outputs:
            top_k = parameters(item.parameters).get("classification", 0)
            expected = "a positive integer (int64_param)"
            outputs.append(requested_output(item.name, True, top_k, expected))
    return InferRequest(
        model_name=message.model_name,
        model_version=message.model_version or None,
        inputs=inputs,
        outputs=outputs,
        id=message.id or None,
        parameters=parameters(message.parameters),
        default_binary=True,
    )


def _contents(item) -> np.ndarray | list:
    contents = item.contents
    given = [name for name in CONTENT_FIELDS if len(getattr(contents, name))]
    expected = CONTENTS.get(item.datatype)
    wants_data = any(d != 0 for d in item.shape)
    if expected is None:  # FP16, BF16 or unknown: the data plane names the datatype problem
        if given or (item.datatype == "FP16" and wants_data):
            raise BadRequest(
                f"input '{item.name}' of datatype {item.datatype} has no typed contents field; "
                "expected raw_input_contents"
            )
        return []
    field, dtype = expected
    if not given and wants_data:
        raise BadRequest(
            f"input '{item.name}' has neither contents.{field} nor raw_input_contents; expected one"
        )
    if given and given != [field]:
        raise BadRequest(
            f"input '{item.name}' of datatype {item.datatype} carries {', '.join(given)}; "
            f"expected {field}"
        )
    values = getattr(contents, field)
    if dtype is None:
        return list(values)
    return np.array(values, dtype=dtype)


def encode_infer(response: InferResponse) -> pb.ModelInferResponse:
    message = pb.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id or ""
    )
    for output in response.outputs:
        array = output.array
        tensor = message.outputs.add()
        tensor.name = output.name
        tensor.datatype = output.datatype
        tensor.shape.extend(array.shape)
        message.raw_output_contents.append(
            bytes_to_binary(array) if array.dtype == object else array.tobytes()
        )
    return message


def from_model(model, message):
    """A pydantic schema (the REST contract) into the protobuf message with the same fields."""
    return json_format.ParseDict(
        model.model_dump(exclude_none=True), message, ignore_unknown_fields=True
    )
