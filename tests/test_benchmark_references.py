"""The reference servers the benchmarks measure bnserve against, as real processes on
127.0.0.1: the least-Python server does the model's whole work (its logits equal bnserve's,
bitwise, with JSON and with binary tensors), so the ratio between the two is bnserve's own
cost and nothing else; the bare floors (ASGI and gRPC) answer without reading anything into a
model, in a form Triton's clients read."""

from __future__ import annotations

import http.client

import numpy as np
import orjson

from benchmarks.overhead import digits_model
from benchmarks.reference import BareServer, poster
from benchmarks.serving import grpc_listening, json_body
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


def _triton_infer(port: int, x: np.ndarray) -> np.ndarray:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    tensor = triton.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    output = triton.InferRequestedOutput("logits", binary_data=True)
    try:
        return client.infer("digits", [tensor], outputs=[output]).as_numpy("logits")
    finally:
        client.close()


def test_least_python_server_answers_binary_tensors_as_bnserve_does(demo_repository):
    rng = np.random.default_rng(1)
    digits = rng.uniform(0, 16, (4, 1, 8, 8)).astype(np.float32)
    least = BareServer("benchmarks.least_python", "--model", str(digits_model(demo_repository)))
    server = ServiceProcess(demo_repository).wait_ready()
    try:
        ours = _triton_infer(least.port, digits)
        theirs = _triton_infer(server.port, digits)
    finally:
        server.stop()
        least.stop()
    assert ours.shape == theirs.shape == (4, 10)
    assert ours.dtype == theirs.dtype == np.float32
    assert np.array_equal(ours, theirs)


def _triton_grpc_infer(port: int, x: np.ndarray) -> np.ndarray:
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    tensor = triton.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    try:
        return client.infer("digits", [tensor]).as_numpy("logits")
    finally:
        client.close()


def test_least_python_grpc_server_answers_what_bnserve_answers(demo_repository):
    digits = np.random.default_rng(2).uniform(0, 16, (5, 1, 8, 8)).astype(np.float32)
    model = str(digits_model(demo_repository))
    least = BareServer("benchmarks.least_python", "--model", model, "--grpc", probe=grpc_listening)
    server = ServiceProcess(demo_repository).wait_ready()
    try:
        ours = _triton_grpc_infer(least.port, digits)
        theirs = _triton_grpc_infer(server.grpc_port, digits)
    finally:
        server.stop()
        least.stop()
    assert ours.shape == theirs.shape == (5, 10)
    assert np.array_equal(ours, theirs)


def test_bare_grpc_floor_answers_a_model_infer_response_tritonclient_reads():
    import tritonclient.grpc as triton

    from benchmarks.h2client import GrpcConnection
    from benchmarks.loadgen import GRPC_INFER, grpc_request

    bare = BareServer("benchmarks.bare_grpc", probe=grpc_listening)
    image = np.zeros((1, 3, 224, 224), np.float32)
    try:
        client = triton.InferenceServerClient(f"127.0.0.1:{bare.port}")
        tensor = triton.InferInput("input", list(image.shape), "FP32")
        tensor.set_data_from_numpy(image)
        answer = client.infer("resnet18", [tensor]).as_numpy("output")
        client.close()
        connection = GrpcConnection("127.0.0.1", bare.port)
        raw = connection.unary(GRPC_INFER, grpc_request(image, "input", "resnet18"), timeout=10)
        connection.close()
    finally:
        bare.stop()
    assert answer.shape == (1, 1000)
    assert answer.dtype == np.float32
    assert not answer.any()
    assert len(raw) > answer.nbytes  # the whole message came back over the bare client too
