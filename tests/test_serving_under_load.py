"""Serving under load and faults, against real servers on 127.0.0.1 with bounded traffic:
dynamic batching stays exact, full queues answer 503 with Retry-After, slow requests 504, hot
reload loses no request, a corrupt version takes down only its model, SIGTERM drains."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pytest
from torch_models import export_small

from service.launcher import ServiceProcess


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    path = tmp_path_factory.mktemp("load")
    export_small(path, version=1, seed=0)
    return path


def session(repo, name="small", version=1):
    return ort.InferenceSession(
        str(repo / name / str(version) / "model.onnx"), providers=["CPUExecutionProvider"]
    )


def body(x: np.ndarray) -> tuple[bytes, dict]:
    header = orjson.dumps(
        {
            "inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                        "parameters": {"binary_data_size": x.nbytes}}],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        }
    )  # fmt: skip
    return header + x.tobytes(), {"inference-header-content-length": str(len(header))}


def infer(
    url: str, x: np.ndarray, client: httpx.Client | None = None, path="/v2/models/small/infer"
):
    content, headers = body(x)
    response = (client or httpx).post(f"{url}{path}", content=content, headers=headers, timeout=60)
    if response.status_code != 200:
        return response, None, None
    size = int(response.headers["inference-header-content-length"])
    header = orjson.loads(response.content[:size])
    out = np.frombuffer(response.content[size:], np.float32).reshape(header["outputs"][0]["shape"])
    return response, out, header["model_version"]


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_dynamic_batching_is_exact_and_really_batches(repo):
    rng = np.random.default_rng(5)
    samples = rng.standard_normal((16, 1, 3, 32, 32)).astype(np.float32)
    expected = [session(repo).run(None, {"x": s})[0] for s in samples]
    env = {"BNSERVE_MAX_BATCH_SIZE": "16", "BNSERVE_MAX_QUEUE_DELAY_US": "50000"}
    with ServiceProcess(repo, env=env) as server:
        config = httpx.get(f"{server.url}/v2/models/small/config").json()
        assert config["max_batch_size"] == 16
        assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 50000
        for _ in range(3):  # several rounds of 16 simultaneous single-sample requests
            barrier = threading.Barrier(16)

            def one(i, barrier=barrier):
                barrier.wait()
                return infer(server.url, samples[i])

            with ThreadPoolExecutor(16) as pool:
                results = list(pool.map(one, range(16)))
            for (response, out, _), want in zip(results, expected, strict=True):
                assert response.status_code == 200, response.text
                assert out.tobytes() == want.tobytes()  # bitwise: as if it ran alone
        text = httpx.get(f"{server.url}/metrics").text
        batches = metric(text, 'bnserve_batch_size_count{model="small"}')
        samples_run = metric(text, 'bnserve_batch_size_sum{model="small"}')
        assert samples_run == 48
        assert batches < 48 / 2, "requests that arrived together should run together"


def test_full_queue_answers_503_with_retry_after(repo):
    env = {"BNSERVE_MAX_QUEUE_SIZE": "2", "BNSERVE_MAX_BATCH_SIZE": "0"}
    x = np.random.default_rng(6).standard_normal((96, 3, 32, 32)).astype(np.float32)
    with ServiceProcess(repo, env=env) as server:
        with ThreadPoolExecutor(24) as pool:
            results = list(pool.map(lambda _: infer(server.url, x)[0], range(24)))
        codes = sorted(r.status_code for r in results)
        assert set(codes) == {200, 503}, codes
        rejected = next(r for r in results if r.status_code == 503)
        assert int(rejected.headers["retry-after"]) >= 1
        assert "queued" in rejected.json()["error"]
        assert infer(server.url, x[:2])[0].status_code == 200  # and it recovers
        text = httpx.get(f"{server.url}/metrics").text
        assert metric(
            text, 'bnserve_rejected_requests_total{model="small",reason="queue_full"}'
        ) == codes.count(503)


def test_slow_request_answers_504(repo):
    x = np.random.default_rng(7).standard_normal((512, 3, 32, 32)).astype(np.float32)
    with ServiceProcess(repo, env={"BNSERVE_REQUEST_TIMEOUT": "0.01"}) as server:
        response = infer(server.url, x)[0]
        assert response.status_code == 504
        assert "took longer than 0.01 s" in response.json()["error"]
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


def test_hot_reload_under_load_fails_no_request(repo, tmp_path):
    live = tmp_path / "repo"
    shutil.copytree(repo, live)
    rng = np.random.default_rng(8)
    inputs = rng.standard_normal((8, 2, 3, 32, 32)).astype(np.float32)
    with ServiceProcess(live) as server:
        stop = threading.Event()
        seen: list[tuple[float, int, str]] = []

        def hammer(worker):
            with httpx.Client() as client:
                while not stop.is_set():
                    started = time.monotonic()
                    response, out, version = infer(server.url, inputs[worker], client)
                    seen.append((started, response.status_code, version))
                    if out is not None:
                        outputs[(version, worker)] = out

        outputs: dict = {}
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(hammer, w) for w in range(4)]
            time.sleep(1.0)
            export_small(live, version=2, seed=1)  # a new version appears atomically...
            loaded = httpx.post(f"{server.url}/v2/repository/models/small/load", timeout=60)
            assert loaded.status_code == 200, loaded.text  # ...and is swapped in
            swapped = time.monotonic()
            time.sleep(1.0)
            stop.set()
            for f in futures:
                f.result()
    codes = {code for _, code, _ in seen}
    assert codes == {200}, f"failed requests during the swap: {codes}"
    assert {version for _, _, version in seen} == {"1", "2"}
    assert {version for started, _, version in seen if started > swapped} == {"2"}
    for (version, worker), out in outputs.items():  # every answer is exactly its version's
        want = session(live, version=int(version)).run(None, {"x": inputs[worker]})[0]
        assert out.tobytes() == want.tobytes()


def test_repository_poll_picks_up_new_versions(repo, tmp_path):
    live = tmp_path / "repo"
    shutil.copytree(repo, live)
    with ServiceProcess(live, env={"BNSERVE_POLL_INTERVAL": "0.2"}) as server:
        assert httpx.get(f"{server.url}/v2/models/small").json()["versions"] == ["1"]
        staging = live / "small" / ".staging-test"
        shutil.copytree(live / "small" / "1", staging)
        card = json.loads((staging / "model.json").read_text())
        (staging / "model.json").write_text(json.dumps({**card, "version": 3}))
        staging.rename(live / "small" / "3")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if httpx.get(f"{server.url}/v2/models/small").json()["versions"] == ["3"]:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the poll did not pick up version 3")
        x = np.zeros((1, 3, 32, 32), np.float32)
        assert infer(server.url, x)[2] == "3"


def test_corrupt_version_makes_only_its_model_unavailable(repo, demo_repository, tmp_path):
    live = tmp_path / "repo"
    shutil.copytree(repo, live)
    shutil.copytree(demo_repository / "digits", live / "digits")
    with ServiceProcess(live) as server:
        broken = live / "small" / "2"
        shutil.copytree(live / "small" / "1", broken)
        (broken / "model.json").write_text(
            (broken / "model.json").read_text().replace('"version": 1', '"version": 2')
        )
        (broken / "reference.onnx").unlink()  # a partial copy
        assert httpx.post(f"{server.url}/v2/repository/models/small/load").status_code == 200
        meta = httpx.get(f"{server.url}/v2/models/small").json()
        assert meta["parameters"]["state"] == "UNAVAILABLE"
        assert "reference.onnx is missing" in meta["parameters"]["reason"]
        x = np.zeros((1, 3, 32, 32), np.float32)
        response = infer(server.url, x)[0]
        assert response.status_code == 503
        assert "reference.onnx is missing" in response.json()["error"]
        digits = {
            "inputs": [
                {"name": "images", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0] * 64}
            ]
        }
        assert httpx.post(f"{server.url}/v2/models/digits/infer", json=digits).status_code == 200
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


@pytest.mark.parametrize(
    ("policy", "ready"), [("all", ["1", "2"]), ("specific:1", ["1"]), ("latest", ["2"])]
)
def test_version_policies(repo, tmp_path, policy, ready):
    live = tmp_path / "repo"
    shutil.copytree(repo, live)
    second = live / "small" / "2"
    shutil.copytree(live / "small" / "1", second)
    card = json.loads((second / "model.json").read_text())
    (second / "model.json").write_text(json.dumps({**card, "version": 2}))
    with ServiceProcess(live, "--version-policy", policy) as server:
        assert httpx.get(f"{server.url}/v2/models/small").json()["versions"] == ready
        for version in ("1", "2"):
            status = httpx.get(f"{server.url}/v2/models/small/versions/{version}/ready").status_code
            assert status == (200 if version in ready else 404)


def test_sigterm_turns_unready_first_then_drains_every_accepted_request(repo):
    """Timeline: SIGTERM -> readiness false, still serving for the drain delay -> listener
    closed, in-flight requests finish -> exit. Every request sent before the listener closes
    gets its 200; after it closes, new connections are refused or reset by the kernel (the
    server never read them: not accepted)."""
    x = np.random.default_rng(9).standard_normal((32, 3, 32, 32)).astype(np.float32)
    drain = 2.0
    env = {"BNSERVE_DRAIN_DELAY": str(drain), "BNSERVE_GRACEFUL_TIMEOUT": "20"}
    server = ServiceProcess(repo, env=env).wait_ready()
    outcomes: list[tuple[float, str]] = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = infer(server.url, x)[0]  # a new connection per request
                outcomes.append((started, str(response.status_code)))
            except httpx.ConnectError:
                outcomes.append((started, "refused"))
                time.sleep(0.05)
            except httpx.HTTPError as exc:
                outcomes.append((started, f"lost: {exc!r}"))
                time.sleep(0.05)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.7)
    sigterm = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert server.status("/v2/health/ready") == 503  # not ready first...
    assert server.status("/v2/models/small/ready") == 503
    assert infer(server.url, x[:1])[0].status_code == 200  # ...while still serving
    code = server.process.wait(30)
    stop.set()
    for t in threads:
        t.join()
    server.stop()
    assert code in (0, -signal.SIGTERM)
    # The listener closes drain seconds after SIGTERM; a starved client thread may connect a
    # little after it recorded its start, hence the margin.
    closing = sigterm + drain - 0.5
    before = [outcome for started, outcome in outcomes if started < closing]
    after = [outcome for started, outcome in outcomes if started >= closing]
    assert before.count("200") > 10
    assert set(before) == {"200"}, [o for o in before if o != "200"]
    assert all(
        o in ("200", "refused") or "reset" in o or "Server disconnected" in o for o in after
    ), after
    assert "Traceback" not in server.output()
