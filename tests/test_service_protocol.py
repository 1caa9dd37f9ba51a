"""The v2 protocol end to end: a real uvicorn server on 127.0.0.1, driven by tritonclient (the
client KServe/Triton users have) and plain HTTP, checked against a direct ORT session."""

from __future__ import annotations

import gzip
import json
import time

import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException


@pytest.fixture(scope="module")
def client(digits_server):
    c = triton.InferenceServerClient(digits_server.url.removeprefix("http://"))
    yield c
    c.close()


@pytest.fixture(scope="module")
def direct(demo_repository):
    """The oracle: ONNX Runtime on model.onnx, in-process, no HTTP."""
    session = ort.InferenceSession(
        str(demo_repository / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    return lambda x: session.run(["logits"], {"images": x})[0]


def infer(client, x: np.ndarray, binary: bool, **kwargs):
    tensor = triton.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    output = triton.InferRequestedOutput("logits", binary_data=binary)
    return client.infer("digits", [tensor], outputs=[output], **kwargs)


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_results_equal_a_direct_session(client, direct, digits_samples, binary):
    x = digits_samples["in_distribution"]
    result = infer(client, x, binary, request_id="req-7")
    got = result.as_numpy("logits")
    np.testing.assert_array_equal(got, direct(x))  # bitwise: same graph, same provider
    response = result.get_response()
    assert response["id"] == "req-7"
    assert response["model_name"] == "digits"
    assert response["model_version"] == "1"


def test_default_outputs_come_back_binary(client, direct, digits_samples):
    """tritonclient without requested outputs asks for binary_data_output."""
    x = digits_samples["inverted"][:5]
    tensor = triton.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("digits", [tensor])
    np.testing.assert_array_equal(result.as_numpy("logits"), direct(x))
    assert "binary_data_size" in result.get_output("logits")["parameters"]


def test_version_specific_infer(client, direct, digits_samples):
    x = digits_samples["in_distribution"][:3]
    tensor = triton.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("digits", [tensor], model_version="1")
    np.testing.assert_array_equal(result.as_numpy("logits"), direct(x))


def test_classification_extension_uses_the_labels(client, direct, digits_samples):
    x = digits_samples["in_distribution"][:4]
    tensor = triton.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    output = triton.InferRequestedOutput("logits", class_count=2)
    top = client.infer("digits", [tensor], outputs=[output]).as_numpy("logits")
    assert top.shape == (4, 2)
    expected = np.argsort(-direct(x), axis=1)[:, :2]
    for row, indices in zip(top, expected, strict=True):
        parsed = [cell.decode().split(":") for cell in row]
        assert [int(p[1]) for p in parsed] == list(indices)
        assert [p[2] for p in parsed] == [str(i) for i in indices]  # labels "0".."9"


def test_health_and_metadata(client, digits_server):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", "1")
    server = client.get_server_metadata()
    assert server["name"] == "bnserve"
    assert "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata("digits")
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"][0]["labels"] == [str(d) for d in range(10)]
    assert meta["versions"] == ["1"]
    assert meta["parameters"]["execution_provider"] == "CPUExecutionProvider"
    layers = [layer["name"] for layer in meta["parameters"]["batch_norm"]]
    assert layers[0] == "input_bn"
    assert "head_bn" in layers
    config = client.get_model_config("digits")
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    index = client.get_model_repository_index()
    assert {"name": "digits", "version": "1", "state": "READY", "reason": ""} in index
    assert httpx.get(f"{digits_server.url}/v2/models/digits/versions/1").status_code == 200


def test_json_data_may_be_nested_or_flat(digits_server, direct, digits_samples):
    x = digits_samples["brightened"][:2]
    for data in (x.tolist(), x.reshape(-1).tolist()):
        body = {
            "inputs": [{"name": "images", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": data}]
        }
        response = httpx.post(f"{digits_server.url}/v2/models/digits/infer", json=body)
        assert response.status_code == 200, response.text
        out = response.json()["outputs"][0]
        assert out["shape"] == [2, 10]
        np.testing.assert_array_equal(np.array(out["data"], np.float32).reshape(2, 10), direct(x))


def test_gzip_request_bodies_are_accepted(digits_server, direct, digits_samples):
    x = digits_samples["in_distribution"][:2]
    body = orjson.dumps(
        {
            "inputs": [
                {"name": "images", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": x.reshape(-1)}
            ]
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    response = httpx.post(
        f"{digits_server.url}/v2/models/digits/infer",
        content=gzip.compress(body),
        headers={"content-encoding": "gzip"},
    )
    assert response.status_code == 200, response.text
    got = np.array(response.json()["outputs"][0]["data"], np.float32).reshape(2, 10)
    np.testing.assert_array_equal(got, direct(x))


def test_request_id_header_is_echoed(digits_server):
    response = httpx.get(f"{digits_server.url}/v2", headers={"x-request-id": "trace-42"})
    assert response.headers["x-request-id"] == "trace-42"
    generated = httpx.get(f"{digits_server.url}/v2").headers["x-request-id"]
    assert len(generated) == 32
    assert generated != httpx.get(f"{digits_server.url}/v2").headers["x-request-id"]


def test_access_log_line_carries_the_request_id_status_and_duration(digits_server):
    httpx.get(f"{digits_server.url}/v2/models/digits", headers={"x-request-id": "trace-77"})
    deadline = time.monotonic() + 5
    while True:  # the background writer writes within its poll interval
        lines = [orjson.loads(line) for line in digits_server.output().splitlines()
                 if line.startswith("{") and "trace-77" in line]  # fmt: skip
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    (line,) = lines
    assert line["logger"] == "bnserve.access"
    assert line["message"] == "GET /v2/models/digits 200"
    assert (line["status"], line["method"], line["path"]) == (200, "GET", "/v2/models/digits")
    assert 0 < line["duration_ms"] < 5000


def test_metrics_count_requests_and_batch_sizes(digits_server, client, digits_samples):
    infer(client, digits_samples["in_distribution"][:3], True)
    text = httpx.get(f"{digits_server.url}/metrics").text
    assert (
        'bnserve_requests_total{code="200",endpoint="/v2/models/{model_name}/infer",model="digits"}'
        in text
    )
    assert 'bnserve_request_batch_size_bucket{le="4.0",model="digits"}' in text
    assert 'bnserve_model_state{model="digits",state="READY",version="1"} 1.0' in text
    assert "bnserve_request_duration_seconds_bucket" in text


def test_openapi_documents_the_v2_request(digits_server):
    schema = httpx.get(f"{digits_server.url}/openapi.json").json()
    infer_op = schema["paths"]["/v2/models/{model_name}/infer"]["post"]
    ref = infer_op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/InferenceRequest"
    assert "RequestInput" in schema["components"]["schemas"]
    assert httpx.get(f"{digits_server.url}/docs").status_code == 200


def test_errors_reach_tritonclient_as_exceptions(client, digits_samples):
    x = digits_samples["in_distribution"][:1]
    tensor = triton.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.infer("nope", [tensor])
    with pytest.raises(InferenceServerException, match="no version '9'"):
        client.infer("digits", [tensor], model_version="9")
    assert json.loads(json.dumps(client.get_model_metadata("digits")))  # still serving
