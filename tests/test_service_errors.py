"""Every client mistake gets a 4xx with the v2 error body naming what was wrong and what was
expected; none gets a 500, and none stops the service serving others."""

from __future__ import annotations

import gzip
import shutil

import httpx
import numpy as np
import orjson
import pytest
from onnx import helper
from onnx_builders import const, model, rand

from export import fold_onnx
from service.launcher import ServiceProcess

MAX_BODY = 256 * 1024
TOKEN = "s3cret-admin"


@pytest.fixture(scope="module")
def zoo(demo_repository, tmp_path_factory):
    """digits, a two-input model, and a version whose model.onnx is corrupt."""
    repo = tmp_path_factory.mktemp("zoo")
    shutil.copytree(demo_repository / "digits", repo / "digits")
    nodes = [
        helper.make_node("MatMul", ["a", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["sum"]),
    ]
    two = model(nodes, [const("w", rand(4, 3))], {"a": [None, 4], "b": [None, 3]}, {"sum": None})
    fold_onnx(two, repository=repo, name="pair")
    fold_onnx(two, repository=repo, name="broken")
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    return repo


@pytest.fixture(scope="module")
def server(zoo):
    env = {"BNSERVE_MAX_REQUEST_BYTES": str(MAX_BODY), "BNSERVE_ADMIN_TOKEN": TOKEN}
    with ServiceProcess(zoo, env=env) as process:
        yield process


def post(server, path, body=None, *, content=None, headers=None):
    return httpx.post(f"{server.url}{path}", json=body, content=content, headers=headers)


def images(shape=(1, 1, 8, 8), datatype="FP32", data=None, **extra):
    count = int(np.prod(shape))
    tensor = {"name": "images", "shape": list(shape), "datatype": datatype,
              "data": data if data is not None else [0.5] * count, **extra}  # fmt: skip
    return {"inputs": [tensor]}


def assert_error(response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    for fragment in fragments:
        assert fragment in body["error"], body["error"]


INFER = "/v2/models/digits/infer"


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        (images(shape=(1, 1, 8, 7)), ["input 'images'", "shape [1, 1, 8, 7]", "expected [-1, 1, 8, 8]"]),
        (images(shape=(1, 8, 8)), ["shape [1, 8, 8]", "expected [-1, 1, 8, 8]"]),
        (images(datatype="FP64"), ["datatype FP64", "expected FP32"]),
        (images(data=[0.5] * 63), ["63 elements", "expected 64"]),
        (images(data=["a"] * 64), ["strings", "expected FP32"]),
        (images(data=[[1, 2], [3]]), ["not a rectangular array"]),
        (images(datatype="BF16"), ["datatype BF16", "expected FP32"]),
        ({"inputs": [{"name": "pixels", "shape": [1], "datatype": "FP32", "data": [1]}]},
         ["unknown input 'pixels'", "'images'"]),
        ({"inputs": []}, ["inputs"]),
        ({"outputs": []}, ["inputs", "Field required"]),
        ({**images(), "outputs": [{"name": "probs"}]}, ["unknown output 'probs'", "'logits'"]),
        ({**images(), "parameters": {"binary_data_output": "yes"}}, ["binary_data_output", "true or false"]),
        (images(parameters={"binary_data_size": -3}), ["binary_data_size -3"]),
        ({"inputs": [{"name": "images", "shape": [1, 1, 8, 8], "datatype": "FP32"}]},
         ["neither data nor binary_data_size"]),
        ({"inputs": [{"name": "images", "shape": [1, 1, 8, 8], "datatype": "FLOAT"}]}, ["datatype"]),
        (images(shape=(2**40, 1, 8, 8), data=[]), ["elements", "at most"]),
    ],
)  # fmt: skip
def test_bad_json_requests_get_400_naming_the_problem(server, body, fragments):
    assert_error(post(server, INFER, body), 400, *fragments)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_are_refused_by_default(server, value):
    x = np.full((1, 1, 8, 8), 0.5, np.float32)
    x[0, 0, 3, 3] = value
    content, headers = binary_request(0, 256)
    content = content[: int(headers["inference-header-content-length"])] + x.tobytes()
    assert_error(post(server, INFER, content=content, headers=headers), 400, "NaN or Inf")
    # JSON cannot carry them at all: NaN and 1e999 are not valid JSON numbers.
    text = b'{"inputs":[{"name":"images","shape":[1],"datatype":"FP32","data":[1e999]}]}'
    assert_error(post(server, INFER, content=text), 400, "not valid JSON")


def test_missing_input_of_a_two_input_model(server):
    body = {"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    assert_error(post(server, "/v2/models/pair/infer", body), 400, "missing input(s) ['b']")


def test_two_input_model_serves(server):
    a, b = rand(2, 4), rand(2, 3)
    body = {"inputs": [
        {"name": "a", "shape": [2, 4], "datatype": "FP32", "data": a.reshape(-1).tolist()},
        {"name": "b", "shape": [2, 3], "datatype": "FP32", "data": b.reshape(-1).tolist()},
    ]}  # fmt: skip
    response = post(server, "/v2/models/pair/infer", body)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["shape"] == [2, 3]


def test_mismatched_batch_sizes_of_two_inputs(server):
    body = {"inputs": [
        {"name": "a", "shape": [2, 4], "datatype": "FP32", "data": [0] * 8},
        {"name": "b", "shape": [1, 3], "datatype": "FP32", "data": [0] * 3},
    ]}  # fmt: skip
    assert_error(post(server, "/v2/models/pair/infer", body), 400, "batch sizes [1, 2]")


def binary_request(count_bytes: int, declared: int, header_length=None, extra=b""):
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "shape": [1, 1, 8, 8],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": declared},
                }
            ]
        }
    )
    content = header + b"\0" * count_bytes + extra
    length = str(len(header)) if header_length is None else header_length
    return content, {"inference-header-content-length": length}


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        ((100, 256), ["needs 256 bytes", "only 100 remain"]),
        ((100, 100), ["100 bytes of binary data", "expected 256"]),
        ((256, 256, None, b"junk"), ["4 bytes of binary data follow"]),
        ((256, 256, "999999"), ["Inference-Header-Content-Length is 999999", "body has"]),
        ((256, 256, "ten"), ["Inference-Header-Content-Length is 'ten'", "integer"]),
        ((256, 256, "0"), ["Inference-Header-Content-Length is 0"]),
    ],
)
def test_bad_binary_requests_get_400(server, args, fragments):
    content, headers = binary_request(*args)
    assert_error(post(server, INFER, content=content, headers=headers), 400, *fragments)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON list; expected an object"),
        (b"", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),  # deeper than any parser allows
    ],
)
def test_malformed_bodies_get_400(server, content, fragment):
    assert_error(post(server, INFER, content=content), 400, fragment)


def test_deeply_nested_data_gets_400(server):
    data: list = [0.5]
    for _ in range(200):
        data = [data]
    assert_error(post(server, INFER, images(data=data)), 400, "images")


def test_unknown_model_and_version_get_404(server):
    assert_error(post(server, "/v2/models/nope/infer", images()), 404, "unknown model 'nope'")
    assert_error(
        post(server, "/v2/models/digits/versions/7/infer", images()), 404, "no version '7'"
    )
    assert_error(httpx.get(f"{server.url}/v2/models/nope"), 404, "unknown model")
    assert_error(httpx.get(f"{server.url}/v2/nothing/here"), 404, "no such endpoint")


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/..%2F..%2Fetc%2Fpasswd/infer",
        "/v2/models/%2e%2e/infer",
        "/v2/models/digits%2F..%2Fdigits/infer",
        "/v2/models/../digits/infer",
    ],
)
def test_path_traversal_names_find_nothing(server, path):
    response = httpx.post(f"{server.url}{path}", json=images())
    assert response.status_code == 404, response.text


def test_repository_load_refuses_traversal_and_unknown_names(server):
    auth = {"authorization": f"Bearer {TOKEN}"}
    for name in ("..%2Fdigits", "%2e%2e", "nope"):
        response = post(server, f"/v2/repository/models/{name}/load", headers=auth)
        assert response.status_code == 404, response.text


def test_body_over_the_limit_gets_413(server):
    big = b"x" * (MAX_BODY + 1)
    assert_error(post(server, INFER, content=big), 413, "exceeds the limit of")
    bomb = gzip.compress(b" " * (MAX_BODY * 8))  # tiny on the wire, huge inflated
    response = post(server, INFER, content=bomb, headers={"content-encoding": "gzip"})
    assert_error(response, 413, "decompressed body")


def test_unsupported_content_encoding_gets_400(server):
    response = post(server, INFER, content=b"{}", headers={"content-encoding": "br"})
    assert_error(response, 400, "Content-Encoding 'br'")


def test_corrupt_model_is_unavailable_with_its_reason(server):
    assert_error(post(server, "/v2/models/broken/infer", {}), 503, "sha256")
    ready = httpx.get(f"{server.url}/v2/models/broken/ready")
    assert ready.status_code == 503
    auth = {"authorization": f"Bearer {TOKEN}"}
    index = post(server, "/v2/repository/index", headers=auth).json()
    broken = next(row for row in index if row["name"] == "broken")
    assert broken["state"] == "UNAVAILABLE"
    assert "sha256" in broken["reason"]


def test_repository_api_needs_the_admin_token(server):
    assert_error(post(server, "/v2/repository/index"), 401, "BNSERVE_ADMIN_TOKEN")
    wrong = {"authorization": "Bearer nope"}
    assert_error(post(server, "/v2/repository/index", headers=wrong), 401, "bearer token")
    ok = post(server, "/v2/repository/index", headers={"authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200


def test_unloaded_model_gets_503_until_loaded_again(server):
    auth = {"authorization": f"Bearer {TOKEN}"}
    body = {"inputs": [
        {"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [0] * 4},
        {"name": "b", "shape": [1, 3], "datatype": "FP32", "data": [0] * 3},
    ]}  # fmt: skip
    assert post(server, "/v2/repository/models/pair/unload", headers=auth).status_code == 200
    assert_error(post(server, "/v2/models/pair/infer", body), 503, "unloaded")
    assert post(server, "/v2/repository/models/pair/load", headers=auth).status_code == 200
    assert post(server, "/v2/models/pair/infer", body).status_code == 200


def test_still_serving_after_all_of_the_above(server):
    response = post(server, INFER, images())
    assert response.status_code == 200
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    assert "Traceback" not in server.output()
