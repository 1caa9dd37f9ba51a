"""Traffic capture against a real server: the shards hold exactly the inputs that were served,
in the documented format (manifest + plain .npy, readable without pickle); bounds stop a
capture and say why; the admin API refuses what it should; an unwritable folder stops start-up."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from torch_models import export_small

from service.launcher import ROOT, ServiceProcess

TOKEN = "admin-secret"
AUTH = {"authorization": f"Bearer {TOKEN}"}
BASE = "/v2/repository/models/small/capture"


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    repo = tmp_path_factory.mktemp("capture-repo")
    export_small(repo)
    return repo


@pytest.fixture(scope="module")
def capture_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("captures") / "nested" / "folder"  # created at start-up


@pytest.fixture(scope="module")
def server(repository, capture_dir):
    env = {
        "BNSERVE_ADMIN_TOKEN": TOKEN,
        "BNSERVE_CAPTURE_DIR": str(capture_dir),
        "BNSERVE_CAPTURE_MAX_SAMPLES": "1000",
        "BNSERVE_DRIFT_SAMPLE_RATE": "0",
    }
    with ServiceProcess(repository, env=env) as process:
        yield process


def infer(url: str, x: np.ndarray) -> None:
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32"}
    tensor["parameters"] = {"binary_data_size": x.nbytes}
    header = orjson.dumps({"inputs": [tensor]})
    response = httpx.post(
        f"{url}/v2/models/small/infer",
        content=header + x.tobytes(),
        headers={"inference-header-content-length": str(len(header))},
    )
    assert response.status_code == 200, response.text


def call(url: str, method: str, path: str = "", **kwargs) -> httpx.Response:
    kwargs.setdefault("headers", AUTH)
    return httpx.request(method, f"{url}{BASE}{path}", **kwargs)


def read_capture(folder: Path) -> tuple[dict, np.ndarray]:
    manifest = json.loads((folder / "manifest.json").read_text())
    arrays = [
        np.load(folder / shard["files"]["x"], allow_pickle=False) for shard in manifest["shards"]
    ]
    for shard, array in zip(manifest["shards"], arrays, strict=True):
        assert array.shape[0] == shard["samples"]
    return manifest, np.concatenate(arrays) if arrays else np.zeros((0, 3, 32, 32), np.float32)


def test_capture_stores_exactly_the_served_inputs_in_the_documented_format(server, capture_dir):
    started = call(server.url, "POST", "/start")
    assert started.status_code == 200, started.text
    status = started.json()
    assert status["state"] == "running"
    assert status["max_samples"] == 1000
    folder = Path(status["path"])
    assert folder.parent == capture_dir / "small" / "1"
    assert folder.name == status["capture_id"]
    rng = np.random.default_rng(5)
    sent = [rng.standard_normal((b, 3, 32, 32)).astype(np.float32) for b in (1, 3, 1, 2)]
    for x in sent:
        infer(server.url, x)
    stopped = call(server.url, "POST", "/stop").json()
    assert stopped["state"] == "stopped"
    assert stopped["stop_reason"] == "stopped through the API"
    assert stopped["samples"] == 7
    assert stopped["bytes"] == 7 * 3 * 32 * 32 * 4
    manifest, stored = read_capture(folder)
    assert manifest["format"] == "bnserve-capture/1"
    assert manifest["model"] == "small"
    assert manifest["version"] == "1"
    assert manifest["capture_id"] == status["capture_id"]
    assert manifest["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [3, 32, 32]}]
    assert manifest["samples"] == 7
    assert manifest["bytes"] == stopped["bytes"]
    assert manifest["stopped"] is not None
    assert manifest["stop_reason"] == "stopped through the API"
    assert manifest["started"].endswith("Z")
    assert stored.dtype == np.float32
    assert stored.tobytes() == np.concatenate(sent).tobytes()
    assert call(server.url, "GET").json() == stopped
    # Requests after the stop are not stored.
    infer(server.url, sent[0])
    assert read_capture(folder)[0]["samples"] == 7


@pytest.mark.parametrize(
    ("bounds", "reason", "samples"),
    [
        ({"max_samples": 5}, "max_samples reached (5 samples)", 5),
        ({"max_bytes": 3 * 3 * 32 * 32 * 4 + 100}, "max_bytes reached", 3),
    ],
)
def test_capture_stops_itself_at_its_bounds_and_says_why(server, bounds, reason, samples):
    status = call(server.url, "POST", "/start", json=bounds).json()
    for _ in range(4):
        infer(server.url, np.ones((2, 3, 32, 32), np.float32))
    deadline = time.monotonic() + 10
    while (status := call(server.url, "GET").json())["pending_samples"] or not status["stopped"]:
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    assert status["state"] == "stopped"
    assert status["stop_reason"].startswith(reason)
    assert status["samples"] == samples
    manifest, stored = read_capture(Path(status["path"]))
    assert stored.shape == (samples, 3, 32, 32)
    assert manifest["stop_reason"] == status["stop_reason"]


def test_bad_capture_requests_are_refused_clearly(server):
    assert call(server.url, "POST", "/start", headers={}).status_code == 401
    assert call(server.url, "GET", headers={"authorization": "Bearer wrong"}).status_code == 401
    over = call(server.url, "POST", "/start", json={"max_samples": 5000})
    assert over.status_code == 400
    assert "BNSERVE_CAPTURE_MAX_SAMPLES=1000" in over.json()["error"]
    for body in ({"max_samples": 0}, {"bogus": 1}, [1]):
        response = call(server.url, "POST", "/start", json=body)
        assert response.status_code == 400, (body, response.text)
    response = call(server.url, "POST", "/start", content=b"{not json")
    assert response.status_code == 400
    unknown = httpx.post(f"{server.url}/v2/repository/models/nope/capture/start", headers=AUTH)
    assert unknown.status_code == 404
    missing = httpx.get(f"{server.url}/v2/repository/models/nope/capture", headers=AUTH)
    assert missing.status_code == 404
    assert "no capture" in missing.json()["error"]
    version = call(server.url, "POST", "/start", json={"version": "7"})
    assert version.status_code == 404
    assert call(server.url, "POST", "/start").status_code == 200
    twice = call(server.url, "POST", "/start")
    assert twice.status_code == 400
    assert "already has capture" in twice.json()["error"]
    assert call(server.url, "POST", "/stop").status_code == 200


def test_capture_is_off_without_a_folder(repository):
    with ServiceProcess(repository, env={"BNSERVE_DRIFT_SAMPLE_RATE": "0"}) as process:
        response = call(process.url, "POST", "/start", headers={})
        assert response.status_code == 404
        assert "BNSERVE_CAPTURE_DIR" in response.json()["error"]


def test_an_unwritable_capture_folder_stops_start_up_naming_the_setting(repository, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = subprocess.run(
        [sys.executable, "-m", "service", "--repository", str(repository), "--port", "0"],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
             "BNSERVE_CAPTURE_DIR": str(blocker / "captures")},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"bnserve: BNSERVE_CAPTURE_DIR={blocker / 'captures'}")
    assert "not writable" in lines[0]


def test_unloading_the_version_stops_its_capture(server):
    assert call(server.url, "POST", "/start").status_code == 200
    infer(server.url, np.zeros((2, 3, 32, 32), np.float32))
    unload = httpx.post(f"{server.url}/v2/repository/models/small/unload", headers=AUTH)
    assert unload.status_code == 200
    status = call(server.url, "GET").json()
    assert status["state"] == "stopped"
    assert status["stop_reason"] == "model version unloaded"
    load = httpx.post(f"{server.url}/v2/repository/models/small/load", headers=AUTH)
    assert load.status_code == 200
    deadline = time.monotonic() + 10
    while (manifest := read_capture(Path(status["path"]))[0])["samples"] < 2:
        assert time.monotonic() < deadline, manifest
        time.sleep(0.1)
    assert manifest["stop_reason"] == "model version unloaded"
