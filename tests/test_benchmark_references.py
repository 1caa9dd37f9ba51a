"""The reference servers benchmarks.overhead measures bnserve against, as real processes on
127.0.0.1: the least-Python server does the model's whole work (its logits equal bnserve's,
bitwise), so the ratio between the two is bnserve's own cost and nothing else; the bare floor
answers without reading anything into a model."""

from __future__ import annotations

import http.client

import numpy as np
import orjson

from benchmarks.overhead import BareServer, digits_model, poster
from benchmarks.serving import json_body
from service.launcher import ServiceProcess


def _post(port: int, body: bytes, headers: dict) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", "/v2/models/digits/infer", body=body, headers=headers)
    response = connection.getresponse()
    assert response.status == 200
    return orjson.loads(response.read())


def test_least_python_server_answers_what_bnserve_answers(demo_repository):
    sample = next((demo_repository / "digits" / "1" / "samples").glob("*.json"))
    tensor = orjson.loads(sample.read_bytes())["inputs"][0]
    digits = np.array(tensor["data"], np.float32).reshape(tensor["shape"])[:3]
    body, headers = json_body(digits, "images")

    least = BareServer("benchmarks.least_python", "--model", str(digits_model(demo_repository)))
    server = ServiceProcess(demo_repository).wait_ready()
    try:
        ours = _post(least.port, body, headers)["outputs"][0]
        theirs = _post(server.port, body, headers)["outputs"][0]
        poster(least.port, "/v2/models/digits/infer", body, headers)()  # the benchmark's client
    finally:
        server.stop()
        least.stop()
    assert ours["shape"] == theirs["shape"] == [3, 10]
    assert ours["name"] == theirs["name"]
    assert ours["datatype"] == theirs["datatype"] == "FP32"
    assert np.array_equal(np.float32(ours["data"]), np.float32(theirs["data"]))


def test_bare_floor_reads_the_body_and_answers_a_fixed_v2_body():
    bare = BareServer()
    try:
        answer = _post(bare.port, b"x" * 100_000, {"content-type": "application/json"})
    finally:
        bare.stop()
    assert answer["model_name"] == "digits"
    assert answer["outputs"][0]["shape"] == [1, 10]
