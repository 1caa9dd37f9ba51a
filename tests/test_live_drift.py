"""Live BatchNorm drift from served traffic, proved against PyTorch: after N single-sample
requests at sample rate 1.0, every layer's pooled per-channel mean and variance equal the
population statistics of that BN's input taken with eval-mode forward hooks over the same N
samples. Monitoring never changes a response (bitwise), windows roll and reset, too few samples
read `insufficient`, and the Prometheus series appear."""

from __future__ import annotations

import time

import httpx
import numpy as np
import orjson
import pytest
import torch
from test_stat_drift import BN_NAMES, rel_error, trained_drift_net

from export import export_model
from service.launcher import ServiceProcess

TOKEN = "debug-secret"
AUTH = {"authorization": f"Bearer {TOKEN}"}
N = 100  # head_bn (no spatial positions) needs 96 values per channel for a verdict


@pytest.fixture(scope="module")
def trained():
    return trained_drift_net()


@pytest.fixture(scope="module")
def repository(trained, tmp_path_factory):
    repo = tmp_path_factory.mktemp("live")
    export_model(trained, torch.randn(4, 3, 9, 9), repository=repo, name="net")
    return repo


def monitored(repository, **env):
    settings = {
        "BNSERVE_DEBUG_TOKEN": TOKEN,
        "BNSERVE_DRIFT_SAMPLE_RATE": "1",
        "BNSERVE_DRIFT_MAX_SAMPLES_PER_S": "0",
        "BNSERVE_DRIFT_MAX_CPU": "0",
        "BNSERVE_DRIFT_WINDOW": "3600",
        **env,
    }
    return ServiceProcess(repository, env=settings)


@pytest.fixture(scope="module")
def server(repository):
    with monitored(repository) as process:
        yield process


def infer(url: str, x: np.ndarray, *, binary: bool = True) -> list[float]:
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32"}
    body, headers = {"inputs": [tensor]}, {}
    if binary:
        tensor["parameters"] = {"binary_data_size": x.nbytes}
        header = orjson.dumps(body)
        headers["inference-header-content-length"] = str(len(header))
        content = header + x.tobytes()
    else:
        tensor["data"] = x.reshape(-1).tolist()
        content = orjson.dumps(body)
    response = httpx.post(f"{url}/v2/models/net/infer", content=content, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["outputs"][0]["data"]


def live(url: str, path: str = "/v2/models/net/stat-drift/live", **params) -> dict:
    response = httpx.get(f"{url}{path}", params=params, headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_samples(url: str, samples: int, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        report = live(url, return_statistics="true")
        if report["current"]["samples"] >= samples and report["monitor"]["pending_samples"] == 0:
            return report
        assert time.monotonic() < deadline, report["monitor"]
        time.sleep(0.1)


def population_statistics(model, x: torch.Tensor) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel mean and biased variance of every BN's input over all of x (eval mode)."""
    taken, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):

            def hook(_m, args, name=name):
                t = args[0].detach().double()
                dims = [0, *range(2, t.dim())]
                taken[name] = (t.mean(dims).numpy(), t.var(dims, unbiased=False).numpy())

            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return taken


def test_pooled_single_sample_traffic_equals_pytorch_population_statistics(server, trained):
    live_reset = httpx.post(f"{server.url}/v2/models/net/stat-drift/live/reset", headers=AUTH)
    assert live_reset.status_code == 200, live_reset.text
    rng = np.random.default_rng(7)
    xs = (rng.standard_normal((N, 3, 9, 9)) * 3 - 2).astype(np.float32)
    for i, x in enumerate(xs):
        infer(server.url, x[None], binary=bool(i % 2))
    report = wait_for_samples(server.url, N)
    window = report["current"]
    assert window["samples"] == N
    assert window["requests"] == N
    expected = population_statistics(trained, torch.from_numpy(xs))
    modules = dict(trained.named_modules())
    assert [layer["name"] for layer in window["layers"]] == BN_NAMES
    for layer in window["layers"]:
        name = layer["name"]
        mean, var = expected[name]
        assert layer["verdict"] != "insufficient", layer
        assert rel_error(layer["global"]["mean"], mean) <= 1e-4, name
        assert rel_error(layer["global"]["var"], var) <= 1e-4, name
        spatial = int(np.prod(xs.shape[2:])) if name == "input_bn" else None
        if spatial:
            assert layer["values_per_channel"] == N * spatial
        # The figures stat-drift documents, recomputed from the pooled statistics.
        rm = modules[name].running_mean.double().numpy()
        rv = modules[name].running_var.double().numpy()
        eps = modules[name].eps
        w2 = np.sqrt((mean - rm) ** 2 + (np.sqrt(var) - np.sqrt(rv)) ** 2) / np.sqrt(rv + eps)
        assert layer["score"] == pytest.approx(w2.mean(), rel=1e-3)
        assert layer["noise_floor"] == pytest.approx(np.sqrt(1.5 / layer["values_per_channel"]))
        shift = np.abs(mean - rm) / np.sqrt(rv + eps)
        assert layer["global"]["mean_shift_mean"] == pytest.approx(shift.mean(), rel=1e-3)
    summary = window["summary"]
    assert summary["verdict"] == "drift"  # inputs at 3 x N(-2, 1) vs training's 2 x N(1, 1)
    assert summary["most_drifted"][0] in BN_NAMES

    # Without return_statistics: the same figures, no per-channel values.
    plain = live(server.url)["current"]["layers"][0]
    assert "mean" not in plain["global"]
    # The version path reports the same version.
    assert live(server.url, "/v2/models/net/versions/1/stat-drift/live")["model_version"] == "1"

    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'bnserve_drift_layer_score{layer="input_bn",model="net",version="1"}' in metrics
    assert 'bnserve_drift_verdict{model="net",version="1"} 2.0' in _eventually_metrics(server)
    sampled = _metric(metrics, 'bnserve_drift_sampled_requests_total{model="net",version="1"}')
    assert sampled >= N
    assert _metric(metrics, 'bnserve_drift_monitor_seconds_total{model="net",version="1"}') > 0


def _eventually_metrics(server, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while True:  # the monitor thread refreshes its gauges once a second
        text = httpx.get(f"{server.url}/metrics").text
        if 'bnserve_drift_verdict{model="net",version="1"} 2.0' in text:
            return text
        if time.monotonic() > deadline:
            return text
        time.sleep(0.2)


def _metric(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in /metrics")


def test_monitoring_never_changes_a_response(server, repository):
    rng = np.random.default_rng(11)
    requests = [rng.standard_normal((b, 3, 9, 9)).astype(np.float32) for b in (1, 1, 4, 2, 1)]
    monitored_outputs = [infer(server.url, x, binary=b) for x in requests for b in (True, False)]
    with monitored(repository, BNSERVE_DRIFT_SAMPLE_RATE="0") as off:
        plain_outputs = [infer(off.url, x, binary=b) for x in requests for b in (True, False)]
        response = httpx.get(f"{off.url}/v2/models/net/stat-drift/live", headers=AUTH)
        assert response.status_code == 404
        assert "BNSERVE_DRIFT_SAMPLE_RATE=0" in response.json()["error"]
    for a, b in zip(monitored_outputs, plain_outputs, strict=True):
        assert np.array_equal(np.float32(a), np.float32(b))
        assert orjson.dumps(a) == orjson.dumps(b)  # the response bytes of the data, too


def test_a_fresh_window_is_insufficient_and_says_how_many_samples_it_needs(server):
    reset = httpx.post(f"{server.url}/v2/models/net/stat-drift/live/reset", headers=AUTH).json()
    report = live(server.url)
    current = report["current"]
    assert current["start"] >= reset["window_start"][:19]
    assert current["samples"] == 0
    summary = current["summary"]
    assert summary["verdict"] == "insufficient"
    assert summary["samples_needed"] == 96  # head_bn: one value per sample, 96 needed
    assert "score" not in summary
    for layer in current["layers"]:
        assert layer["verdict"] == "insufficient"
        assert "score" not in layer
        assert "global" not in layer
        assert layer["values_needed"] == 96
    # A few samples: the spatial layers are judged, head_bn still lacks values.
    for x in np.random.default_rng(3).standard_normal((3, 1, 3, 9, 9)).astype(np.float32):
        infer(server.url, x)
    current = wait_for_samples(server.url, 3)["current"]
    verdicts = {layer["name"]: layer["verdict"] for layer in current["layers"]}
    assert verdicts["head_bn"] == "insufficient"
    assert verdicts["input_bn"] != "insufficient"
    assert current["summary"]["samples_needed"] == 93


def test_the_cpu_budget_skips_samples_and_bounds_the_monitors_time(repository):
    # 0.1 % of a core banks 10 ms: a few runs, then sampled requests are skipped and counted.
    with monitored(repository, BNSERVE_DRIFT_MAX_CPU="0.001") as process:
        x = np.ones((1, 3, 9, 9), np.float32)
        started = time.monotonic()
        for _ in range(200):
            infer(process.url, x)
        time.sleep(1.5)  # the monitor thread runs or skips what is still queued
        elapsed = time.monotonic() - started
        monitor = live(process.url)["monitor"]
        assert monitor["max_cpu"] == 0.001
        assert monitor["sampled_requests"] == 200
        assert 0 < monitor["skipped_requests"] < 200
        assert monitor["pending_samples"] == 0
        # share x (elapsed + banked 10 s), plus the run and the gauge refresh that overdraw it
        assert monitor["monitor_seconds"] <= 0.001 * (elapsed + 10) + 0.05
        metrics = httpx.get(f"{process.url}/metrics").text
        assert _metric(
            metrics, 'bnserve_drift_skipped_requests_total{model="net",version="1"}'
        ) == float(monitor["skipped_requests"])


def test_windows_roll_into_history_and_are_sampled_within_the_cap(repository):
    env = {
        "BNSERVE_DRIFT_WINDOW": "1",
        "BNSERVE_DRIFT_HISTORY": "3",
        "BNSERVE_DRIFT_SAMPLE_RATE": "0.5",
        "BNSERVE_DRIFT_MAX_SAMPLES_PER_S": "4",
    }
    with monitored(repository, **env) as process:
        x = np.ones((1, 3, 9, 9), np.float32)
        started = time.monotonic()
        for _ in range(60):
            infer(process.url, x)
        elapsed = time.monotonic() - started
        time.sleep(2.2)
        report = live(process.url)
        monitor = report["monitor"]
        assert 0 < monitor["sampled_requests"] <= 4 + 4 * elapsed + 1  # burst + rate
        history = report["history"]
        assert 1 <= len(history) <= 3
        assert all(not w["current"] for w in history)
        assert report["current"]["current"]
        starts = [w["start"] for w in history] + [report["current"]["start"]]
        assert starts == sorted(starts)
        assert sum(w["samples"] for w in history) + report["current"]["samples"] <= 60
        # Counted per sampled request in Prometheus too.
        metrics = httpx.get(f"{process.url}/metrics").text
        assert _metric(
            metrics, 'bnserve_drift_sampled_requests_total{model="net",version="1"}'
        ) == float(monitor["sampled_requests"])


@pytest.mark.parametrize(
    ("call", "status", "needle"),
    [
        (("get", "/v2/models/nope/stat-drift/live", AUTH), 404, "unknown model 'nope'"),
        (("get", "/v2/models/net/versions/9/stat-drift/live", AUTH), 404, "no version '9'"),
        (("get", "/v2/models/net/stat-drift/live?return_statistics=maybe", AUTH), 400,
         "return_statistics"),
        (("get", "/v2/models/net/stat-drift/live", {}), 401, "BNSERVE_DEBUG_TOKEN"),
        (("post", "/v2/models/net/stat-drift/live/reset", {}), 401, "BNSERVE_DEBUG_TOKEN"),
        (("post", "/v2/models/nope/stat-drift/live/reset", AUTH), 404, "unknown model"),
        (("get", "/v2/models/net/stat-drift/live/reset", AUTH), 405, "method not allowed"),
    ],
)  # fmt: skip
def test_bad_live_requests_are_refused_clearly(server, call, status, needle):
    method, path, headers = call
    response = httpx.request(method.upper(), f"{server.url}{path}", headers=headers)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]


@pytest.mark.parametrize(
    ("setting", "value", "expected"),
    [
        ("BNSERVE_DRIFT_SAMPLE_RATE", "1.5", "less than or equal to 1"),
        ("BNSERVE_DRIFT_SAMPLE_RATE", "often", "valid number"),
        ("BNSERVE_DRIFT_WINDOW", "0", "greater than 0"),
        ("BNSERVE_DRIFT_MAX_SAMPLES_PER_S", "-1", "greater than or equal to 0"),
    ],
)
def test_bad_monitoring_settings_stop_start_up_in_one_line(repository, setting, value, expected):
    import subprocess
    import sys

    from service.launcher import ROOT

    result = subprocess.run(
        [sys.executable, "-m", "service", "--repository", str(repository), "--port", "0"],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), setting: value},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"bnserve: invalid setting {setting}={value!r}")
    assert expected in lines[0]
