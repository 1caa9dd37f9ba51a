"""Shared fixtures. The demo repository is built once per session through the real CLI."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300):
    """Run `python -m <args>` as a user would, with the project and tests importable."""
    paths = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="session")
def demo_repository(tmp_path_factory) -> Path:
    """A model repository holding models/digits/1, made by `python -m export demo`."""
    repo = tmp_path_factory.mktemp("repository")
    result = run_cli("export", "demo", "--repository", str(repo))
    assert result.returncode == 0, result.stderr
    return repo


@pytest.fixture(scope="session")
def digits_server(demo_repository):
    """`python -m service` serving the demo repository on 127.0.0.1."""
    from service.launcher import ServiceProcess

    with ServiceProcess(demo_repository, "--log-format", "json") as server:
        yield server


@pytest.fixture(scope="session")
def digits_samples(demo_repository) -> dict:
    """The demo's sample batches (v2 request bodies) as numpy arrays, by name."""
    import numpy as np
    import orjson

    folder = demo_repository / "digits" / "1" / "samples"
    samples = {}
    for path in folder.glob("*.json"):
        tensor = orjson.loads(path.read_bytes())["inputs"][0]
        samples[path.stem] = np.array(tensor["data"], np.float32).reshape(tensor["shape"])
    return samples
