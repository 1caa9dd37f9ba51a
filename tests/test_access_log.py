"""The access log's JSON line, made on the event loop without a LogRecord, is byte for byte the
line JsonFormatter makes from the record `logging` would have made; and a configured writer
writes it."""

from __future__ import annotations

import logging
import os
import time

import orjson
import pytest

from service.logs import AccessEntry, JsonFormatter, LogWriter, TextFormatter, fd_sink


@pytest.mark.parametrize(
    ("request_id", "path", "code"),
    [
        ("ab12cd34ef56ab780000000000000001", "/v2/models/digits/infer", 200),
        (None, "/inference.GRPCInferenceService/ModelInfer", "INVALID_ARGUMENT"),
        ("x", '/v2/models/"q"\u00e9\\/infer', 404),
    ],
)
def test_json_line_is_the_formatters_line(request_id, path, code):
    entry = AccessEntry(time.time(), request_id, "POST", path, code, 0.412)
    assert entry.json_line() == JsonFormatter().format(entry.record())
    line = orjson.loads(entry.json_line())
    assert line["message"] == f"POST {path} {code}"
    assert line[("status" if isinstance(code, int) else "grpc_code")] == code


def _written(formatter: logging.Formatter, items) -> list[str]:
    read, write = os.pipe()
    writer = LogWriter(formatter, fd_sink(write)).start()
    for item in items:
        writer.put(item)
    assert writer.close()
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        return pipe.read().decode().splitlines()


def test_writer_writes_lines_entries_and_records_in_order():
    entry = AccessEntry(time.time(), "rid", "GET", "/v2/health/ready", 200, 0.05)
    record = logging.LogRecord("bnserve.app", logging.INFO, "", 0, "ready: %d", (2,), None)
    json_lines = _written(JsonFormatter(), [entry.json_line(), entry, record])
    assert json_lines[0] == json_lines[1] == entry.json_line()
    assert orjson.loads(json_lines[2])["message"] == "ready: 2"
    text_lines = _written(TextFormatter(), [entry])
    assert text_lines[0].endswith("GET /v2/health/ready 200 [rid]")
