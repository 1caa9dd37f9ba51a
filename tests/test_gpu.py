"""The CUDA execution provider path. Skipped, with the reason, wherever CUDA cannot run (CI
never has a GPU); run on a GPU host with `pytest tests/test_gpu.py -m gpu`."""

from __future__ import annotations

import itertools

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper
from onnx_builders import bn_node, bn_params, const, model, rand

from export import fold_onnx
from service.launcher import ServiceProcess
from service.runtime import CPU, CUDA, SessionFactory, cuda_unusable_reason

REASON = cuda_unusable_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=f"no CUDA: {REASON}")]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A conv/BN network big enough for cuDNN to pick real algorithms, folded by export."""
    nodes, inits, x = [], [], "x"
    channels = [3, 32, 64, 64, 128]
    for i, (cin, cout) in enumerate(itertools.pairwise(channels)):
        inits += [
            const(f"w{i}", rand(cout, cin, 3, 3) / np.sqrt(9 * cin)),
            *bn_params(f"bn{i}", cout),
        ]
        nodes += [
            helper.make_node(
                "Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1], strides=[2 if i else 1] * 2
            ),
            bn_node(f"bn{i}", f"c{i}", f"b{i}"),
            helper.make_node("Relu", [f"b{i}"], [f"r{i}"]),
        ]
        x = f"r{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"]))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["output"]))
    path = tmp_path_factory.mktemp("gpu")
    fold_onnx(
        model(nodes, inits, {"x": [None, 3, 64, 64]}, {"output": None}), repository=path, name="net"
    )
    return path


def sessions(repo):
    file = repo / "net" / "1" / "model.onnx"
    return SessionFactory("cuda").create(file), SessionFactory("cpu").create(file)


def test_cuda_session_really_runs_on_cuda(repo):
    cuda, cpu = sessions(repo)
    assert cuda.get_providers()[0] == CUDA
    assert cpu.get_providers() == [CPU]
    options = cuda.get_provider_options()[CUDA]
    assert options["cudnn_conv_algo_search"] == "DEFAULT"
    assert options["use_tf32"] == "0"


def test_cuda_matches_cpu_and_repeats_bitwise(repo):
    cuda, cpu = sessions(repo)
    x = np.random.default_rng(0).standard_normal((16, 3, 64, 64)).astype(np.float32)
    on_gpu = cuda.run(None, {"x": x})[0]
    on_cpu = cpu.run(None, {"x": x})[0]
    assert np.abs(on_gpu - on_cpu).max() / np.abs(on_cpu).max() <= 1e-4
    for _ in range(20):
        assert cuda.run(None, {"x": x})[0].tobytes() == on_gpu.tobytes()


def test_cuda_batch_independence(repo):
    """cuDNN may choose other algorithms per batch size; outputs must still agree closely."""
    cuda, _ = sessions(repo)
    x = np.random.default_rng(1).standard_normal((16, 3, 64, 64)).astype(np.float32)
    together = cuda.run(None, {"x": x})[0]
    worst = max(
        float(np.abs(cuda.run(None, {"x": x[i : i + 1]})[0] - together[i : i + 1]).max())
        for i in range(0, 16, 5)
    )
    assert worst / np.abs(together).max() <= 1e-5
    print(f"CUDA batch independence: max rel diff {worst / np.abs(together).max():.2e}")


def test_service_reports_cuda_and_serves_stat_drift_on_it(repo):
    with ServiceProcess(repo, env={"BNSERVE_PROVIDERS": "cuda"}) as server:
        meta = httpx.get(f"{server.url}/v2/models/net").json()
        assert meta["parameters"]["execution_provider"] == CUDA
        x = np.random.default_rng(2).standard_normal((4, 3, 64, 64)).astype(np.float32)
        body = {
            "inputs": [
                {
                    "name": "x",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "data": x.reshape(-1).tolist(),
                }
            ]
        }
        response = httpx.post(f"{server.url}/v2/models/net/infer", json=body, timeout=60)
        assert response.status_code == 200, response.text
        got = np.array(response.json()["outputs"][0]["data"], np.float32)
        cpu = ort.InferenceSession(str(repo / "net" / "1" / "model.onnx"), providers=[CPU])
        want = cpu.run(None, {"x": x})[0].reshape(-1)
        assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4
        drift = httpx.post(f"{server.url}/v2/models/net/stat-drift", json=body, timeout=60)
        assert drift.status_code == 200, drift.text
        assert [layer["name"] for layer in drift.json()["layers"]] == ["bn0", "bn1", "bn2", "bn3"]
