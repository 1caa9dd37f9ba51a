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
from benchmarks.reference import BareServer, grpc_listening, poster
from benchmarks.serving import binary_body, json_body
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

    model = str(digits_model(demo_repository))
    with BareServer("benchmarks.least_python", "--model", model) as least:
        with ServiceProcess(demo_repository) as server:
            ours = _post(least.port, body, headers)["outputs"][0]
            theirs = _post(server.port, body, headers)["outputs"][0]
        poster(least.port, "/v2/models/digits/infer", body, headers)()  # the benchmark's client
    assert ours["shape"] == theirs["shape"] == [3, 10]
    assert ours["name"] == theirs["name"]
    assert ours["datatype"] == theirs["datatype"] == "FP32"
    assert np.array_equal(np.float32(ours["data"]), np.float32(theirs["data"]))


def test_bare_floor_reads_the_body_and_answers_a_fixed_v2_body():
    with BareServer() as bare:
        answer = _post(bare.port, b"x" * 100_000, {"content-type": "application/json"})
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
    digits = np.random.default_rng(1).uniform(0, 16, (4, 1, 8, 8)).astype(np.float32)
    body, headers = binary_body(digits, "images")
    model = str(digits_model(demo_repository))
    with BareServer("benchmarks.least_python", "--model", model) as least:
        with ServiceProcess(demo_repository) as server:
            ours = _triton_infer(least.port, digits)
            theirs = _triton_infer(server.port, digits)
        connection = http.client.HTTPConnection("127.0.0.1", least.port, timeout=30)
        connection.request("POST", "/v2/models/digits/infer", body=body, headers=headers)
        response = connection.getresponse()
        answer = response.read()
        connection.close()
    assert ours.shape == theirs.shape == (4, 10)
    assert ours.dtype == theirs.dtype == np.float32
    assert np.array_equal(ours, theirs)
    # answered in kind: the logits as raw bytes after a JSON header, not as JSON numbers
    header_length = int(response.getheader("inference-header-content-length"))
    assert answer[header_length:] == ours.tobytes()


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
    least_grpc = ("benchmarks.least_python", "--model", model, "--grpc")
    with (
        BareServer(*least_grpc, probe=grpc_listening) as least,
        ServiceProcess(demo_repository) as server,
    ):
        ours = _triton_grpc_infer(least.port, digits)
        theirs = _triton_grpc_infer(server.grpc_port, digits)
    assert ours.shape == theirs.shape == (5, 10)
    assert np.array_equal(ours, theirs)


def test_bare_grpc_floor_answers_a_model_infer_response_tritonclient_reads():
    import tritonclient.grpc as triton

    from benchmarks.h2client import GrpcConnection
    from benchmarks.loadgen import GRPC_INFER, grpc_request

    image = np.zeros((1, 3, 224, 224), np.float32)
    with BareServer("benchmarks.bare_grpc", probe=grpc_listening) as bare:
        client = triton.InferenceServerClient(f"127.0.0.1:{bare.port}")
        try:
            tensor = triton.InferInput("input", list(image.shape), "FP32")
            tensor.set_data_from_numpy(image)
            answer = client.infer("resnet18", [tensor]).as_numpy("logits")
        finally:
            client.close()
        connection = GrpcConnection("127.0.0.1", bare.port)
        try:
            raw = connection.unary(GRPC_INFER, grpc_request(image, "input", "resnet18"), timeout=10)
        finally:
            connection.close()
    assert answer.shape == (1, 10)
    assert answer.dtype == np.float32
    assert not answer.any()
    assert len(raw) > answer.nbytes  # the whole message came back over the bare client too
