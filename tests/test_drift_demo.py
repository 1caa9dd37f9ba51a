"""The drift loop demo end to end: a real server on 127.0.0.1 with capture on and every request
sampled, `python -m export.drift_demo` driving it over HTTP (brightened stream, live drift,
capture, recalibrate, load, live drift again), accuracies measured through the server."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_cli

from service.launcher import ServiceProcess

ADMIN_TOKEN = "demo-admin-token"


@pytest.fixture(scope="module")
def demo_run(demo_repository, tmp_path_factory):
    root = tmp_path_factory.mktemp("drift_demo")
    repository = root / "models"
    shutil.copytree(demo_repository / "digits" / "1", repository / "digits" / "1")
    captures = root / "captures"
    env = {
        "BNSERVE_CAPTURE_DIR": str(captures),
        "BNSERVE_DRIFT_SAMPLE_RATE": "1",
        "BNSERVE_DRIFT_MAX_SAMPLES_PER_S": "0",
        "BNSERVE_DRIFT_MAX_CPU": "0",
        "BNSERVE_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    with ServiceProcess(repository, env=env) as server:
        if server.status("/v2/models/digits/stat-drift/live") == 404:
            pytest.skip("the live drift endpoints (issue 10, service side) are not in this tree")
        result = run_cli(
            "export.drift_demo",
            "--url",
            server.url,
            "--repository",
            str(repository),
            "--capture-dir",
            str(captures),
            "--admin-token",
            ADMIN_TOKEN,
            timeout=600,
        )
    return result, repository


def test_demo_closes_the_loop(demo_run):
    result, repository = demo_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("result: "))
    figures = json.loads(line.removeprefix("result: "))
    assert figures["versions"] == ["1", "2"]
    assert figures["live_drift"] == {"before": "drift", "after": "ok"}
    accuracy = figures["accuracy"]
    # Measured, not assumed: recalibration on the brightened stream must recover most of the
    # accuracy the shift took (about 0.39 -> 0.96 on the 450 held-out test images).
    assert accuracy["before_in_distribution"] >= 0.95
    assert accuracy["after_shifted"] >= accuracy["before_shifted"] + 0.3
    card = json.loads((repository / "digits" / "2" / "model.json").read_text())
    assert card["recalibration"]["parent_version"] == 1
    assert card["recalibration"]["method"] == "onnxruntime"
    assert 100 <= card["recalibration"]["capture"]["samples"] <= 1347  # the writer may drop
