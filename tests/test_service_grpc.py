"""gRPC (KServe v2 / Triton GRPCInferenceService) end to end: a real `python -m service` on
127.0.0.1 serving REST and gRPC from one process, driven by tritonclient.grpc (the client Triton
users have) and by Triton's own protobuf messages. Outputs are bitwise those of REST and of a
direct ONNX Runtime session; every client mistake gets a status code and REST's message."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper
from onnx_builders import const, model, rand
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from export import fold_onnx
from service.launcher import ROOT, ServiceProcess

MAX_BODY = 256 * 1024
TOKEN = "s3cret-admin"
AUTH = {"authorization": f"Bearer {TOKEN}"}
INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def zoo(demo_repository, tmp_path_factory):
    """digits; a two-input model with dynamic batching set in its model.json; the same graph
    declared with a fixed batch of 2 (the exporter always writes a dynamic batch axis, so its
    model.json is edited); a version whose model.onnx is corrupt; a 3x3 convolution over images
    of any size (ONNX Runtime refuses those smaller than 3x3)."""
    repo = tmp_path_factory.mktemp("grpc-zoo")
    shutil.copytree(demo_repository / "digits", repo / "digits")
    nodes = [
        helper.make_node("MatMul", ["a", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["sum"]),
    ]
    weights = [const("w", rand(4, 3))]
    fold_onnx(model(nodes, weights, {"a": [None, 4], "b": [None, 3]}, {"sum": None}), repository=repo, name="pair")  # fmt: skip
    fold_onnx(model(nodes, weights, {"a": [None, 4], "b": [None, 3]}, {"sum": None}), repository=repo, name="fixed")  # fmt: skip
    fold_onnx(model(nodes, weights, {"a": [None, 4], "b": [None, 3]}, {"sum": None}), repository=repo, name="broken")  # fmt: skip
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    conv = [helper.make_node("Conv", ["x", "k"], ["y"])]
    fold_onnx(model(conv, [const("k", rand(1, 1, 3, 3))], {"x": [None, 1, None, None]}, {"y": None}), repository=repo, name="conv")  # fmt: skip
    card = repo / "pair" / "1" / "model.json"
    document = json.loads(card.read_text())
    document["serving"] = {"max_batch_size": 4, "max_queue_delay_us": 700}
    card.write_text(json.dumps(document))
    card = repo / "fixed" / "1" / "model.json"
    document = json.loads(card.read_text())
    for tensor in (*document["inputs"], *document["outputs"]):
        tensor["shape"][0] = 2
    card.write_text(json.dumps(document))
    return repo


@pytest.fixture(scope="module")
def server(zoo):
    env = {"BNSERVE_MAX_REQUEST_BYTES": str(MAX_BODY), "BNSERVE_ADMIN_TOKEN": TOKEN}
    with ServiceProcess(zoo, env=env) as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    c = tg.InferenceServerClient(server.grpc_address)
    yield c
    c.close()


@pytest.fixture(scope="module")
def rest(server):
    c = th.InferenceServerClient(server.url.removeprefix("http://"))
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(server):
    """Triton's own generated stub and messages: an oracle independent of bnserve's proto."""
    channel = grpc.insecure_channel(server.grpc_address)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def raw_call(server):
    """ModelInfer with bytes in and out: for messages no protobuf library would write."""
    channel = grpc.insecure_channel(server.grpc_address)
    yield channel.unary_unary(INFER)
    channel.close()


@pytest.fixture(scope="module")
def direct(demo_repository):
    session = ort.InferenceSession(
        str(demo_repository / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    return lambda x: session.run(["logits"], {"images": x})[0]


def grpc_infer(client, x, name="digits", *, tensor="images", **kwargs):
    item = tg.InferInput(tensor, list(x.shape), tg.np_to_triton_dtype(x.dtype))
    item.set_data_from_numpy(x)
    return client.infer(name, [item], **kwargs)


def rest_infer(rest, x, *, binary=True, **kwargs):
    item = th.InferInput("images", list(x.shape), "FP32")
    item.set_data_from_numpy(x, binary_data=binary)
    return rest.infer("digits", [item], **kwargs)


def grpc_error(call, *args, **kwargs) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)
    return caught.value.status(), caught.value.message()


def rest_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]


# -- every RPC ------------------------------------------------------------------------------
def test_health_and_server_metadata(client, server):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", "1")
    assert not client.is_model_ready("broken")
    # Unknown models and versions are not ready, as Triton answers (REST: 404 with the reason).
    assert not client.is_model_ready("nope")
    assert not client.is_model_ready("digits", "7")
    metadata = client.get_server_metadata(as_json=True)
    assert metadata == httpx.get(f"{server.url}/v2").json()
    assert {"statistics", "binary_tensor_data", "classification"} <= set(metadata["extensions"])


def test_model_metadata_matches_rest(client, server):
    got = client.get_model_metadata("digits", as_json=True)
    want = httpx.get(f"{server.url}/v2/models/digits").json()
    assert got["name"] == want["name"] == "digits"
    assert got["versions"] == want["versions"] == ["1"]
    assert got["platform"] == want["platform"]
    for kind in ("inputs", "outputs"):
        assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in got[kind]] == [
            (t["name"], t["datatype"], t["shape"]) for t in want[kind]
        ]


@pytest.mark.parametrize("sample", ["in_distribution", "inverted"])
def test_outputs_are_bitwise_those_of_rest_and_a_direct_session(
    client, rest, direct, digits_samples, sample
):
    x = digits_samples[sample]
    result = grpc_infer(client, x, request_id="req-9")
    got = result.as_numpy("logits")
    assert got.tobytes() == direct(x).tobytes()
    assert got.tobytes() == rest_infer(rest, x).as_numpy("logits").tobytes()
    assert got.tobytes() == rest_infer(rest, x, binary=False).as_numpy("logits").tobytes()
    response = result.get_response(as_json=True)
    assert response["id"] == "req-9"
    assert response["model_name"] == "digits"
    assert response["model_version"] == "1"


def test_typed_contents_give_the_same_outputs_as_raw_bytes(stub, direct, digits_samples):
    x = digits_samples["in_distribution"][:3]
    request = service_pb2.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="images", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    response = stub.ModelInfer(request)
    assert response.outputs[0].shape == [3, 10]
    assert response.raw_output_contents[0] == direct(x).tobytes()


def test_classification_matches_rest(client, rest, digits_samples):
    x = digits_samples["in_distribution"][:4]
    wanted = [tg.InferRequestedOutput("logits", class_count=3)]
    got = grpc_infer(client, x, outputs=wanted).as_numpy("logits")
    item = th.InferInput("images", list(x.shape), "FP32")
    item.set_data_from_numpy(x)
    rest_out = rest.infer(
        "digits", [item], outputs=[th.InferRequestedOutput("logits", class_count=3)]
    )
    assert got.shape == (4, 3)
    assert got.tolist() == rest_out.as_numpy("logits").tolist()


def test_classification_of_an_image_output_ranks_all_of_each_samples_values(client, rest):
    """As Triton: a (N, 1, H, W) output's classes are each sample's H*W values (this crashed
    on a reshape before the randomized test found it)."""
    x = np.random.default_rng(10).standard_normal((2, 1, 5, 4)).astype(np.float32)
    y = grpc_infer(client, x, "conv", tensor="x").as_numpy("y")  # (2, 1, 3, 2)
    wanted = [tg.InferRequestedOutput("y", class_count=4)]
    got = grpc_infer(client, x, "conv", tensor="x", outputs=wanted).as_numpy("y")
    flat = y.reshape(2, -1)
    top = np.argsort(-flat, axis=1, kind="stable")[:, :4]
    expected = [[f"{flat[n, i]:f}:{i}".encode() for i in top[n]] for n in range(2)]
    assert got.tolist() == expected
    item = th.InferInput("x", list(x.shape), "FP32")
    item.set_data_from_numpy(x)
    outputs = [th.InferRequestedOutput("y", class_count=4)]
    assert rest.infer("conv", [item], outputs=outputs).as_numpy("y").tolist() == expected


def test_two_inputs_with_dynamic_batching(client):
    a, b = rand(3, 4), rand(3, 3)
    inputs = []
    for name, value in (("a", a), ("b", b)):
        item = tg.InferInput(name, list(value.shape), "FP32")
        item.set_data_from_numpy(value)
        inputs.append(item)
    out = client.infer("pair", inputs).as_numpy("sum")
    assert out.shape == (3, 3)


def test_model_config_reports_the_batch_limit_as_triton_does(client, server):
    for name in ("digits", "pair", "fixed"):
        got = client.get_model_config(name, as_json=True)["config"]
        want = httpx.get(f"{server.url}/v2/models/{name}/config").json()
        assert int(got.get("max_batch_size", 0)) == want["max_batch_size"], name
        assert [[int(d) for d in t["dims"]] for t in got["input"]] == [
            t["dims"] for t in want["input"]
        ]
        assert ("dynamic_batching" in got) == ("dynamic_batching" in want)
    digits = httpx.get(f"{server.url}/v2/models/digits/config").json()
    assert digits["max_batch_size"] == (MAX_BODY - 64 * 1024) // 256  # 64 FP32 per sample
    assert digits["input"] == [{"name": "images", "data_type": "TYPE_FP32", "dims": [1, 8, 8]}]
    assert "dynamic_batching" not in digits
    pair = httpx.get(f"{server.url}/v2/models/pair/config").json()
    assert pair["max_batch_size"] == 4
    assert pair["dynamic_batching"]["max_queue_delay_microseconds"] == 700
    assert [t["dims"] for t in pair["input"]] == [[4], [3]]
    fixed = httpx.get(f"{server.url}/v2/models/fixed/config").json()
    assert fixed["max_batch_size"] == 0
    assert [t["dims"] for t in fixed["input"]] == [[2, 4], [2, 3]]
    # One version's config, over both protocols (Triton's /versions/{v}/config route).
    assert httpx.get(f"{server.url}/v2/models/digits/versions/1/config").json() == digits
    assert int(client.get_model_config("digits", "1", as_json=True)["config"]["max_batch_size"]) == digits["max_batch_size"]  # fmt: skip
    missing = httpx.get(f"{server.url}/v2/models/digits/versions/7/config")
    assert grpc_error(client.get_model_config, "digits", "7") == ("StatusCode.NOT_FOUND", rest_error(missing, 404))  # fmt: skip


def test_statistics_count_requests_samples_and_runs(client, server, digits_samples):
    def snapshot():
        stats = client.get_inference_statistics("digits", "1", as_json=True)["model_stats"][0]
        return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))

    before_samples, before_runs = snapshot()
    x = digits_samples["in_distribution"][:5]
    for _ in range(3):
        grpc_infer(client, x)
    samples, runs = snapshot()
    assert samples - before_samples == 15
    assert runs - before_runs == 3
    grpc_stats = client.get_inference_statistics("digits", as_json=True)["model_stats"][0]
    for path in (
        "/v2/models/stats",
        "/v2/models/digits/stats",
        "/v2/models/digits/versions/1/stats",
    ):
        body = httpx.get(f"{server.url}{path}").json()
        digits = next(s for s in body["model_stats"] if s["name"] == "digits")
        assert digits["inference_count"] == int(grpc_stats["inference_count"])
        for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
            duration = digits["inference_stats"][key]
            assert duration["count"] == int(grpc_stats["inference_stats"][key]["count"])
            assert duration["ns"] > 0
    assert httpx.get(f"{server.url}/v2/models/nope/stats").status_code == 404
    assert grpc_error(client.get_inference_statistics, "nope")[0] == "StatusCode.NOT_FOUND"


def test_repository_calls_need_the_admin_token(client, server):
    status, message = grpc_error(client.get_model_repository_index)
    assert status == "StatusCode.UNAUTHENTICATED"
    assert message == rest_error(httpx.post(f"{server.url}/v2/repository/index"), 401)
    wrong = grpc_error(client.get_model_repository_index, headers={"authorization": "Bearer no"})
    assert wrong[0] == "StatusCode.UNAUTHENTICATED"
    index = client.get_model_repository_index(headers=AUTH, as_json=True)["models"]
    assert {row["name"] for row in index} == {"digits", "pair", "fixed", "broken", "conv"}
    broken = next(row for row in index if row["name"] == "broken")
    assert broken["state"] == "UNAVAILABLE"
    assert "sha256" in broken["reason"]


def test_unload_and_load_over_grpc(client):
    client.unload_model("pair", headers=AUTH)
    assert not client.is_model_ready("pair")
    status, message = grpc_error(grpc_infer, client, rand(1, 4), "pair", tensor="a")
    assert status == "StatusCode.UNAVAILABLE"
    assert "unloaded" in message
    client.load_model("pair", headers=AUTH)
    assert client.is_model_ready("pair")
    assert grpc_error(client.load_model, "nope", headers=AUTH)[0] == "StatusCode.NOT_FOUND"


# -- client mistakes: a status code and REST's message, never INTERNAL -----------------------
def images(shape=(1, 1, 8, 8), datatype="FP32"):
    count = int(np.prod(shape))
    tensor = {"name": "images", "shape": list(shape), "datatype": datatype, "data": [0.5] * count}
    return {"inputs": [tensor]}


@pytest.mark.parametrize(
    ("model_name", "version", "x", "rest_path", "rest_body", "code", "status"),
    [
        ("nope", "", np.zeros((1, 1, 8, 8), np.float32), "/v2/models/nope/infer", images(), "NOT_FOUND", 404),
        ("digits", "7", np.zeros((1, 1, 8, 8), np.float32), "/v2/models/digits/versions/7/infer", images(), "NOT_FOUND", 404),
        ("digits", "", np.zeros((1, 1, 8, 8), np.float64), "/v2/models/digits/infer", images(datatype="FP64"), "INVALID_ARGUMENT", 400),
        ("digits", "", np.zeros((1, 1, 8, 7), np.float32), "/v2/models/digits/infer", images(shape=(1, 1, 8, 7)), "INVALID_ARGUMENT", 400),
        ("broken", "", np.zeros((1, 4), np.float32), "/v2/models/broken/infer", images(), "UNAVAILABLE", 503),
    ],
)  # fmt: skip
def test_errors_carry_the_status_and_message_rest_gives(  # noqa: PLR0917
    client, server, model_name, version, x, rest_path, rest_body, code, status
):
    tensor = "a" if model_name == "broken" else "images"
    got = grpc_error(grpc_infer, client, x, model_name, tensor=tensor, model_version=version)
    assert got[0] == f"StatusCode.{code}"
    assert got[1] == rest_error(httpx.post(f"{server.url}{rest_path}", json=rest_body), status)


@pytest.mark.parametrize(
    ("model_name", "version", "tensor", "shape", "rest_path", "code", "status", "fragment"),
    [
        # str.isdigit() is true for these, but they are no version number.
        ("digits", "²", "images", (1, 1, 8, 8), "/v2/models/digits/versions/%C2%B2/infer", "NOT_FOUND", 404, "has no version '²'; expected one of ['1']"),
        ("digits", "١", "images", (1, 1, 8, 8), "/v2/models/digits/versions/%D9%A1/infer", "NOT_FOUND", 404, "has no version '١'"),
        ("digits", "", "images", (0, 1, 8, 8), "/v2/models/digits/infer", "INVALID_ARGUMENT", 400, "batch size 0; expected at least 1"),
        # The signature allows any size; ONNX Runtime refuses a 2x2 image for a 3x3 kernel.
        ("conv", "", "x", (1, 1, 2, 2), "/v2/models/conv/infer", "INVALID_ARGUMENT", 400, "model 'conv' cannot run these inputs"),
    ],
)  # fmt: skip
def test_client_errors_past_the_signature_check_are_not_internal(  # noqa: PLR0917
    client, server, model_name, version, tensor, shape, rest_path, code, status, fragment
):
    x = np.full(shape, 0.5, np.float32)
    got = grpc_error(grpc_infer, client, x, model_name, tensor=tensor, model_version=version)
    assert got[0] == f"StatusCode.{code}"
    assert fragment in got[1]
    body = {"inputs": [{"name": tensor, "shape": list(shape), "datatype": "FP32", "data": x.ravel().tolist()}]}  # fmt: skip
    assert got[1] == rest_error(httpx.post(f"{server.url}{rest_path}", json=body), status)
    for classified in ({"classification": 3},) if shape[0] == 0 else ():  # no 500 either
        item = {**body["inputs"][0]}
        answer = httpx.post(f"{server.url}{rest_path}", json={"inputs": [item], "outputs": [{"name": "logits", "parameters": classified}]})  # fmt: skip
        assert "batch size 0" in rest_error(answer, 400)


def infer_request(raw: list[bytes], shape=(1, 1, 8, 8), datatype="FP32", count=1):
    request = service_pb2.ModelInferRequest(model_name="digits")
    for _ in range(count):
        request.inputs.add(name="images", datatype=datatype, shape=list(shape))
    request.raw_input_contents.extend(raw)
    return request


def call_status(stub, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)
    return caught.value.code(), caught.value.details()


@pytest.mark.parametrize(
    ("request_", "fragments"),
    [
        (infer_request([b"\0" * 256, b"\0" * 256]), ["raw_input_contents has 2 entries for 1 inputs"]),
        (infer_request([b"\0" * 100]), ["input 'images' has 100 bytes of binary data", "expected 256"]),
        (infer_request([b"\0" * 256] * 2, count=2), ["input 'images' is given twice"]),
        (infer_request([b"\0" * 512], datatype="FP64"), ["datatype FP64", "expected FP32"]),
        (infer_request([b"\0" * 128], datatype="BF16"), ["datatype BF16", "expected FP32"]),
        (infer_request([b"\0" * 256], datatype="FLOAT"), ["datatype FLOAT", "expected FP32"]),
        (infer_request([], shape=(1, 1, 8, 8)), ["neither contents.fp32_contents nor raw_input_contents"]),
        (infer_request([], datatype="FP16"), ["datatype FP16 has no typed contents field; expected raw_input_contents"]),
        (infer_request([b"\0" * 256], shape=(2**40, 1, 8, 8)), ["elements", "at most"]),
    ],
)  # fmt: skip
def test_bad_raw_requests_get_invalid_argument(stub, request_, fragments):
    code, message = call_status(stub, request_)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, message
    for fragment in fragments:
        assert fragment in message, message


def test_contents_of_the_wrong_type_and_both_kinds_of_data(stub):
    request = infer_request([])
    request.inputs[0].contents.int_contents.extend([1] * 64)
    code, message = call_status(stub, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "carries int_contents; expected fp32_contents" in message
    request = infer_request([b"\0" * 256])
    request.inputs[0].contents.fp32_contents.extend([0.0] * 64)
    assert "both contents and raw_input_contents" in call_status(stub, request)[1]
    request = infer_request([b"\0" * 256])
    request.outputs.add(name="probs")
    code, message = call_status(stub, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown output 'probs'; expected one of ['logits']" in message


@pytest.mark.parametrize(
    "payload", [b"\xff\xff\xff\xff", b"\x0a\x05abc", b"\x3a\xff\xff\xff\xff\x0f"]
)
def test_malformed_protobuf_gets_invalid_argument(raw_call, payload):
    with pytest.raises(grpc.RpcError) as caught:
        raw_call(payload)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid ModelInferRequest protobuf message" in caught.value.details()


def refused_too_large(server) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith('bnserve_rejected_requests_total{model="",reason="too_large"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_messages_over_the_limit_get_resource_exhausted(stub, server):
    before = refused_too_large(server)
    code, message = call_status(stub, infer_request([b"\0" * (MAX_BODY + 1)]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "exceeds the limit of 262144 bytes (BNSERVE_MAX_REQUEST_BYTES)" in message
    assert "exceeds the limit of 262144 bytes" in rest_error(
        httpx.post(f"{server.url}/v2/models/digits/infer", content=b"x" * (MAX_BODY + 1)), 413
    )
    assert refused_too_large(server) == before + 2  # one counter, whichever protocol refused
    # Far over it, grpcio itself refuses before reading the message into memory.
    code, _ = call_status(stub, infer_request([b"\0" * (MAX_BODY + 4 * 1024 * 1024)]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_non_finite_inputs_are_refused(stub):
    x = np.full((1, 1, 8, 8), 0.5, np.float32)
    x[0, 0, 1, 1] = np.nan
    code, message = call_status(stub, infer_request([x.tobytes()]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "NaN or Inf" in message


# Per-sample dims of the zoo's inputs (None: any size), for requests that are nearly right.
SIGNATURES = {
    "digits": {"images": (1, 8, 8)},
    "pair": {"a": (4,), "b": (3,)},
    "fixed": {"a": (4,), "b": (3,)},
    "conv": {"x": (1, None, None)},
}
DATATYPES = ["FP32", "FP64", "FP16", "BF16", "INT8", "UINT8", "INT64", "BOOL", "BYTES", "fp32", ""]
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,  # the broken model
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


MUTATIONS = [
    "version", "model", "batch 0", "datatype", "shape", "short data", "long data",
    "extra raw", "drop input", "twice", "unknown input", "int contents", "non-finite",
    "classification", "unknown output", "typed and raw",
]  # fmt: skip


@st.composite
def hostile_infer_requests(draw) -> service_pb2.ModelInferRequest:
    """A right request for one of the zoo's models (any image size for conv; classification
    asked for a third of the time), then up to two random mistakes: the model or version,
    names, datatypes, shapes, data of the wrong size or kind, non-finite values, outputs and
    their classification parameter."""
    name = draw(st.sampled_from(list(SIGNATURES)))
    batch = 2 if name == "fixed" else draw(st.integers(1, 3))
    mistakes = set(draw(st.lists(st.sampled_from(MUTATIONS), max_size=2)))
    if "batch 0" in mistakes:
        batch = 0
    version = ""
    if "version" in mistakes:
        odd = st.sampled_from(["1", "2", "0", "01", "²", "١", "-1", " 1"]) | st.text(max_size=3)
        version = draw(odd)
    if "model" in mistakes:
        name = draw(st.sampled_from(["broken", "nope"]) | st.text(max_size=6))
    request = service_pb2.ModelInferRequest(model_name=name, model_version=version)
    signature = SIGNATURES.get(name, SIGNATURES["digits"])
    names = list(signature)
    if "drop input" in mistakes:
        names = names[1:]
    if "twice" in mistakes:
        names = names + names[:1]
    if "unknown input" in mistakes:
        names.append(draw(st.text(max_size=4)))
    typed = "int contents" in mistakes or draw(st.integers(0, 3)) == 0
    for input_name in names:
        dims = signature.get(input_name, (1, 8, 8))
        shape = [batch, *(draw(st.integers(0, 12)) if d is None else d for d in dims)]
        if "shape" in mistakes:
            shape = draw(st.lists(st.integers(-2, 9) | st.sampled_from([2**31, 2**40]), max_size=5))  # fmt: skip
        datatype = draw(st.sampled_from(DATATYPES)) if "datatype" in mistakes else "FP32"
        tensor = request.inputs.add(name=input_name, datatype=datatype, shape=shape)
        count = min(max(0, int(np.prod(shape, dtype=np.float64))), 4096)
        count += -1 if "short data" in mistakes else 1 if "long data" in mistakes else 0
        values = np.full(max(count, 0), 0.25, np.float32)
        if "non-finite" in mistakes and values.size:
            values[draw(st.integers(0, values.size - 1))] = draw(st.sampled_from([np.nan, np.inf]))
        if "int contents" in mistakes:
            tensor.contents.int_contents.extend([1] * max(count, 0))
        elif typed:
            tensor.contents.fp32_contents.extend(values.tolist())
        if not typed or "typed and raw" in mistakes:
            request.raw_input_contents.append(values.tobytes())
    if "extra raw" in mistakes:
        request.raw_input_contents.append(draw(st.binary(max_size=64)))
    classified = draw(st.integers(0, 2)) == 0  # a feature, not a mistake: often asked for
    if classified or "classification" in mistakes or "unknown output" in mistakes:
        output = {"digits": "logits", "pair": "sum", "fixed": "sum", "conv": "y"}.get(name, "y")
        wanted = request.outputs.add(name="nope" if "unknown output" in mistakes else output)
        which = "int" if "classification" not in mistakes else draw(st.sampled_from(["int", "string", "bool"]))  # fmt: skip
        if which == "int":
            top = st.integers(-3, 2**40) if "classification" in mistakes else st.integers(1, 12)
            wanted.parameters["classification"].int64_param = draw(top)
        elif which == "string":
            wanted.parameters["classification"].string_param = draw(st.text(max_size=3))
        else:
            wanted.parameters["classification"].bool_param = True
    return request


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=hostile_infer_requests())
def test_no_request_gets_internal(stub, request):
    """Randomized: whatever a client sends, the answer is OK or a client-error status with a
    message, never INTERNAL or UNKNOWN (and the server goes on; see the next test)."""
    call = stub.ModelInfer.future(request, timeout=30)
    code, details = call.code(), call.details()
    if code != grpc.StatusCode.OK:
        assert code in CLIENT_ERRORS, (code, details, request)
        assert details, code
        assert not details.startswith("internal error"), details


def as_rest(request: service_pb2.ModelInferRequest) -> tuple[str, bytes, dict]:
    """The same request over REST: JSON data for typed contents, binary for raw contents."""
    version = f"/versions/{quote(request.model_version, safe='')}" if request.model_version else ""
    path = f"/v2/models/{quote(request.model_name, safe='')}{version}/infer"
    raw, inputs, blobs = list(request.raw_input_contents), [], []
    for index, item in enumerate(request.inputs):
        entry = {"name": item.name, "shape": list(item.shape), "datatype": item.datatype}
        contents = item.contents
        if contents.fp32_contents or contents.int_contents:
            entry["data"] = list(contents.fp32_contents) or list(contents.int_contents)
        if index < len(raw):
            entry["parameters"] = {"binary_data_size": len(raw[index])}
            blobs.append(raw[index])
        inputs.append(entry)
    outputs = []
    for item in request.outputs:
        value = item.parameters.get("classification")
        kind = value.WhichOneof("parameter_choice") if value is not None else None
        parameters = {"classification": getattr(value, kind)} if kind else {}
        outputs.append({"name": item.name, "parameters": parameters})
    header = json.dumps({"inputs": inputs, **({"outputs": outputs} if outputs else {})}).encode()
    if blobs:
        return path, header + b"".join(blobs), {"inference-header-content-length": str(len(header))}  # fmt: skip
    return path, header, {"content-type": "application/json"}


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=hostile_infer_requests())
def test_no_rest_request_gets_a_500(server, request):
    """The randomized requests above, over REST (JSON and binary tensors): a 4xx or the
    broken model's 503 with an error message, never a 500."""
    path, body, headers = as_rest(request)
    answer = httpx.post(f"{server.url}{path}", content=body, headers=headers, timeout=30)
    if answer.status_code != 200:
        assert 400 <= answer.status_code < 500 or answer.status_code == 503, (answer.text, path, body[:300])  # fmt: skip
        assert answer.json()["error"], answer.text


def test_still_serving_after_the_hostile_calls(client, server, digits_samples):
    assert client.is_server_ready()
    grpc_infer(client, digits_samples["in_distribution"][:1])
    output = server.output()
    assert "Traceback" not in output
    assert '"grpc_code":"INVALID_ARGUMENT"' in output  # access log lines carry the status
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'endpoint="/inference.GRPCInferenceService/ModelInfer"' in metrics


# -- overload, timeouts, shutdown ------------------------------------------------------------
@pytest.fixture(scope="module")
def small_repo(tmp_path_factory):
    from torch_models import export_small

    path = tmp_path_factory.mktemp("grpc-small")
    export_small(path, version=1, seed=0)
    return path


def test_full_queue_is_unavailable_and_slow_requests_deadline_exceeded(small_repo):
    env = {
        "BNSERVE_MAX_QUEUE_SIZE": "2",
        "BNSERVE_MAX_BATCH_SIZE": "0",
        "BNSERVE_REQUEST_TIMEOUT": "0.01",
    }
    x = np.random.default_rng(6).standard_normal((96, 3, 32, 32)).astype(np.float32)
    with ServiceProcess(small_repo, env=env) as server:

        def one(_):
            with tg.InferenceServerClient(server.grpc_address) as c:
                try:
                    grpc_infer(c, x, "small", tensor="x")
                    return "StatusCode.OK", ""
                except InferenceServerException as exc:
                    return exc.status(), exc.message()

        with ThreadPoolExecutor(24) as pool:
            results = list(pool.map(one, range(24)))
        codes = {status for status, _ in results}
        assert codes <= {"StatusCode.OK", "StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED"}
        assert "StatusCode.UNAVAILABLE" in codes, results
        refused = next(m for s, m in results if s == "StatusCode.UNAVAILABLE")
        assert "queued" in refused
        with grpc.insecure_channel(server.grpc_address) as channel:  # Retry-After, as metadata
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = service_pb2.ModelInferRequest(model_name="small")
            request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
            request.raw_input_contents.append(x.tobytes())
            futures = [stub.ModelInfer.future(request) for _ in range(24)]
            trailers = []
            for future in futures:
                if future.exception() is not None and future.code() == grpc.StatusCode.UNAVAILABLE:
                    trailers.append(dict(future.trailing_metadata()))
        assert trailers, "a full queue refuses some of 24 simultaneous calls"
        assert all(int(t["retry-after"]) >= 1 for t in trailers)
        big = np.random.default_rng(7).standard_normal((512, 3, 32, 32)).astype(np.float32)
        with tg.InferenceServerClient(server.grpc_address) as c:
            status, message = grpc_error(grpc_infer, c, big, "small", tensor="x")
        assert status == "StatusCode.DEADLINE_EXCEEDED"
        assert message == (
            "inference on model 'small' took longer than 0.01 s (BNSERVE_REQUEST_TIMEOUT); "
            "abandoned"
        )


def digits_call(x: np.ndarray) -> bytes:
    request = service_pb2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="images", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request.SerializeToString()


def unfinished_call(port: int, message: bytes | None = None, sent: int = 8):
    """A bare HTTP/2 connection with a ModelInfer call whose message has not finished
    arriving (its first `sent` bytes only): in flight in the server until the rest comes
    (`finish_call`) or the connection closes. Returns (connection, the bytes not sent)."""
    from benchmarks.h2client import DATA, END_HEADERS, HEADERS, GrpcConnection, frame

    message = message if message is not None else b"\x0a\x06digits" + b"\0" * 992
    conn = GrpcConnection("127.0.0.1", port)
    framed = b"\x00" + len(message).to_bytes(4, "big") + message
    first, rest = framed[: 5 + sent], framed[5 + sent :]
    headers = conn.request_headers(INFER)
    conn.sock.sendall(frame(HEADERS, END_HEADERS, 1, headers) + frame(DATA, 0, 1, first))
    return conn, rest


def finish_call(conn, rest: bytes) -> bytes:
    """Send the rest of an unfinished call's message; its answer's message (the GOAWAY of a
    server shutting down does not end the call)."""
    from benchmarks.h2client import DATA, END_STREAM, frame

    conn.sock.sendall(frame(DATA, END_STREAM, 1, rest))
    return conn.response(1)


def test_a_call_in_flight_at_sigterm_completes(demo_repository, digits_samples):
    """SIGTERM closes the listeners; a gRPC call the service had already taken still gets its
    answer (its message even finishes arriving after the signal), then the process exits 0."""
    x = digits_samples["in_distribution"][:2]
    message = digits_call(x)
    env = {"BNSERVE_DRAIN_DELAY": "0", "BNSERVE_GRACEFUL_TIMEOUT": "60"}
    server = ServiceProcess(demo_repository, env=env).wait_ready()
    try:
        conn, rest = unfinished_call(server.grpc_port, message, sent=64)
        time.sleep(1.0)  # grpcio takes the call off the connection
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert server.process.poll() is None, "the graceful stop waits for the call"
        answer = service_pb2.ModelInferResponse.FromString(finish_call(conn, rest))
        logits = np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(2, 10)
        assert np.isfinite(logits).all()
        assert server.process.wait(30) == 0
        conn.close()
    finally:
        server.stop()


def test_sigint_during_the_drain_cancels_grpc_calls_and_exits(demo_repository):
    """SIGTERM waits up to BNSERVE_GRACEFUL_TIMEOUT for a call in flight; Ctrl-C then exits at
    once, as uvicorn does for REST, instead of waiting out the grace period."""
    env = {"BNSERVE_DRAIN_DELAY": "0", "BNSERVE_GRACEFUL_TIMEOUT": "60"}
    server = ServiceProcess(demo_repository, env=env).wait_ready()
    try:
        conns = [unfinished_call(server.grpc_port)[0]]
        time.sleep(1.0)  # grpcio takes the call off the connection
        server.process.send_signal(signal.SIGTERM)
        time.sleep(1.5)
        assert server.process.poll() is None, "the graceful stop waits for the call in flight"
        sent = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        server.process.wait(15)
        assert time.monotonic() - sent < 10
        for conn in conns:
            conn.close()
    finally:
        server.stop()


def test_sigterm_drains_rest_and_grpc_then_exits(demo_repository):
    server = ServiceProcess(demo_repository, env={"BNSERVE_DRAIN_DELAY": "1.5"}).wait_ready()
    try:
        c = tg.InferenceServerClient(server.grpc_address)
        assert c.is_server_ready()
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 1.0
        while c.is_server_ready() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not c.is_server_ready()  # both report not ready while draining
        assert server.status("/v2/health/ready") == 503
        x = np.zeros((1, 1, 8, 8), np.float32)
        assert grpc_infer(c, x).as_numpy("logits").shape == (1, 10)  # and still serve
        c.close()
        assert server.process.wait(30) == 0
    finally:
        server.stop()
    with socket.socket() as probe:  # the gRPC port is closed too
        assert probe.connect_ex(("127.0.0.1", server.grpc_port)) != 0


def test_a_grpc_port_in_use_stops_start_up_with_the_reason(demo_repository):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ServiceProcess(demo_repository, "--grpc-port", str(port))
        with pytest.raises(RuntimeError, match="gRPC cannot listen"):
            server.wait_ready(timeout=60)
        server.stop()


def test_grpc_off_with_port_zero(demo_repository):
    with ServiceProcess(demo_repository, env={"BNSERVE_GRPC_PORT": "0"}) as server:
        assert server.status("/v2/health/ready") == 200
        assert "gRPC listening" not in server.output()


def test_tritonclient_and_bnserve_protos_live_in_one_process():
    """bnserve's messages use their own protobuf package, so importing them next to
    tritonclient's `inference` package registers no name twice."""
    from service.protocol.grpc import bnserve_inference_pb2 as ours

    theirs = service_pb2.ModelInferRequest(model_name="m", raw_input_contents=[b"\1\2"])
    mine = ours.ModelInferRequest.FromString(theirs.SerializeToString())
    assert mine.model_name == "m"
    assert list(mine.raw_input_contents) == [b"\1\2"]


def test_generated_module_matches_the_proto():
    pytest.importorskip("grpc_tools")
    result = subprocess.run(
        [sys.executable, "-m", "service.protocol.grpc.generate", "--check"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
