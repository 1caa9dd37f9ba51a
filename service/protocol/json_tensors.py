"""JSON request parsing with tensor `data` arrays going straight to numpy.

A general JSON parser builds one Python number per element (150k for one 224x224x3 image), which
numpy then copies again. simdjson parses the document once and exports a flat array of numbers
as a buffer, 3-4x faster end to end. Only flat arrays of numbers of a numeric datatype take that
path; anything else (nested, mixed, strings, booleans) becomes Python lists, so the codec's
checks give the same errors as for any other request.
"""

from __future__ import annotations

import threading

import numpy as np
import simdjson

# of_type for Array.as_buffer, by the datatype the request declares.
_BUFFER_TYPES = {
    **dict.fromkeys(("FP16", "FP32", "FP64"), ("d", np.float64)),
    **dict.fromkeys(("INT8", "INT16", "INT32", "INT64"), ("i", np.int64)),
    **dict.fromkeys(("UINT8", "UINT16", "UINT32", "UINT64"), ("u", np.uint64)),
}
_REUSE_ERROR = "Tried to re-use a parser"
# A parser keeps buffers of about 3x the largest document it has parsed: reusing one saves the
# page faults of fresh buffers (half the parse time for a 13 MB body), but only documents up to
# this size may leave their buffers behind; larger ones get a parser that goes with them.
REUSE_LIMIT = 16 * 1024 * 1024
_local = threading.local()


class InvalidJSON(ValueError):
    """The body is not a JSON document (the message says why)."""


def loads(data: bytes | memoryview):
    """Parse a JSON document; each inputs[i].data that is a flat array of numbers comes back as
    a 1-D numpy array (float64, int64 or uint64, exact), everything else as Python objects."""
    return _request(_parse(data))


def _parse(data: bytes | memoryview):
    if len(data) > REUSE_LIMIT:
        parser = simdjson.Parser()
    else:
        parser = getattr(_local, "parser", None) or _new_parser()
    try:
        return parser.parse(data)
    except RuntimeError as exc:
        if str(exc).startswith(_REUSE_ERROR):  # a proxy of the last document is still alive
            return _new_parser().parse(data)
        raise InvalidJSON(str(exc)) from None
    except ValueError as exc:
        raise InvalidJSON(str(exc)) from None


def _new_parser() -> simdjson.Parser:
    _local.parser = simdjson.Parser()
    return _local.parser


def _plain(value):
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


def _request(document):
    if not isinstance(document, simdjson.Object):
        return _plain(document)
    request = {}
    for key in document:  # keys; items() would turn every array into a list
        value = document[key]
        if key == "inputs" and isinstance(value, simdjson.Array):
            request[key] = [_input(item) for item in value]
        else:
            request[key] = _plain(value)
    return request


def _input(item):
    if not isinstance(item, simdjson.Object):
        return _plain(item)
    datatype = item.get("datatype")
    converted = {}
    for key in item:
        value = item[key]
        if key == "data" and isinstance(value, simdjson.Array):
            converted[key] = _numbers(value, datatype)
        else:
            converted[key] = _plain(value)
    return converted


def _numbers(array: simdjson.Array, datatype):
    buffer_type = _BUFFER_TYPES.get(datatype) if isinstance(datatype, str) else None
    if buffer_type is None:
        return array.as_list()
    of_type, dtype = buffer_type
    try:
        values = np.frombuffer(array.as_buffer(of_type=of_type), dtype=dtype)
    except (TypeError, ValueError):  # not all numbers of that kind: the codec says which
        return array.as_list()
    if values.size != len(array):  # nested arrays, flattened: keep the shape checks
        return array.as_list()
    return values
