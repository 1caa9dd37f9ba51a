"""The fast JSON path (simdjson, data straight to numpy) decodes exactly what the general path
(orjson, Python lists, numpy) decodes, and leaves everything it cannot take to that path."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.dataplane.validation import from_json as _from_json
from service.errors import BadRequest
from service.protocol.codec import parse_request
from service.protocol.json_tensors import InvalidJSON, loads


def request(data, datatype="FP32", shape=None) -> bytes:
    shape = shape if shape is not None else [len(data)]
    return orjson.dumps(
        {"id": "r", "inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data}]}
    )


def oracle(body: bytes, datatype: str) -> np.ndarray:
    data = orjson.loads(body)["inputs"][0]["data"]
    return _from_json("x", data, datatype, int(np.prod(np.shape(data))))


floats = st.floats(allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(floats | st.integers(-(2**53), 2**53), max_size=200),
    st.sampled_from(["FP16", "FP32", "FP64"]),
)
def test_float_data_matches_the_general_path_bit_for_bit(values, datatype):
    body = request(values, datatype)
    data = loads(body)["inputs"][0]["data"]
    assert isinstance(data, np.ndarray)
    fast = _from_json("x", data, datatype, len(values))
    expected = oracle(body, datatype)
    assert fast.dtype == expected.dtype
    assert fast.tobytes() == expected.tobytes()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=100))
def test_int64_data_is_exact_beyond_float_precision(values):
    data = loads(request(values, "INT64"))["inputs"][0]["data"]
    assert data.dtype == np.int64
    assert data.tolist() == values


def outcome(data, datatype: str, count: int):
    try:
        return _from_json("x", data, datatype, count).tobytes()
    except BadRequest as exc:
        return str(exc)


@pytest.mark.parametrize(
    ("data", "datatype", "count"),
    [
        ([[1, 2], [3]], "FP32", 3),  # flattened it would have the right count
        ([1, [2, 3], 4], "FP32", 4),
        ([1.0, True], "FP32", 2),
        ([1.0, "2"], "FP32", 2),
        ([1.0, None], "FP32", 2),
        ([1.5, 2.0], "INT32", 2),
        ([-1, 2], "UINT8", 2),
        ([300], "INT8", 1),
        ([2**63], "INT64", 1),
        ([True, False], "BOOL", 2),
        (["a", "b"], "BYTES", 2),
    ],
)
def test_what_the_fast_path_cannot_take_gets_the_general_path_outcome(data, datatype, count):
    body = request(data, datatype, shape=[count])
    parsed, _ = parse_request(body, None)
    general = orjson.loads(body)["inputs"][0]["data"]
    assert outcome(parsed.inputs[0].data, datatype, count) == outcome(general, datatype, count)


def test_ragged_data_is_refused_even_when_its_flattened_count_fits():
    parsed, _ = parse_request(request([[1, 2], [3]], shape=[3]), None)
    assert "not a rectangular array" in outcome(parsed.inputs[0].data, "FP32", 3)


def test_nested_rectangular_data_still_decodes():
    x = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    request_, _ = parse_request(request(x.tolist(), shape=[2, 2, 3]), None)
    assert np.array_equal(_from_json("x", request_.inputs[0].data, "FP32", 12), x.reshape(-1))


@pytest.mark.parametrize(
    "body", [b"", b"{", b'{"inputs": [1e400]}', b"[" * 2000 + b"]" * 2000, b"\xff\xfe"]
)
def test_invalid_documents_raise_invalid_json(body):
    with pytest.raises(InvalidJSON):
        loads(body)


def test_a_proxy_left_alive_does_not_break_the_next_request():
    # An exception holding the last document's proxies (a traceback) must not make the
    # shared per-thread parser refuse the next document.
    import simdjson

    from service.protocol import json_tensors

    parser = json_tensors._local.parser = simdjson.Parser()
    alive = parser.parse(b'{"inputs": []}')
    assert loads(request([1.0, 2.0]))["inputs"][0]["data"].tolist() == [1.0, 2.0]
    del alive


def test_a_large_document_leaves_no_parser_buffers_behind():
    from service.protocol import json_tensors

    kept = json_tensors._local.parser = json_tensors.simdjson.Parser()
    values = [0.5] * (json_tensors.REUSE_LIMIT // 4)
    body = request(values)
    assert len(body) > json_tensors.REUSE_LIMIT
    data = loads(body)["inputs"][0]["data"]
    assert data.size == len(values)
    assert json_tensors._local.parser is kept  # the large one was not kept
