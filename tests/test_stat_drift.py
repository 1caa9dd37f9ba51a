"""The stat-drift endpoint, proved against PyTorch: the batch-statistics outputs equal the
model's train-mode forward (on a deep copy), the global-statistics outputs equal eval, and each
layer's statistics equal those taken by forward hooks on the BatchNorm inputs."""

from __future__ import annotations

import copy

import httpx
import numpy as np
import orjson
import pytest
import torch
from torch import nn

from export import export_model
from service.launcher import ServiceProcess

TOKEN = "debug-secret"


class DriftNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_bn = nn.BatchNorm2d(3)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.block = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2), nn.ReLU(), nn.BatchNorm2d(12))
        self.fc = nn.Linear(12, 6)
        self.head_bn = nn.BatchNorm1d(6)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(self.input_bn(x))))
        x = self.block(x).mean((2, 3))
        return self.head_bn(self.fc(x))


BN_NAMES = ["input_bn", "bn1", "block.2", "head_bn"]


def trained_drift_net() -> DriftNet:
    """DriftNet with running statistics from a few train-mode passes, in eval mode."""
    torch.manual_seed(3)
    model = DriftNet().train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(32, 3, 9, 9) * 2 + 1)
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    return trained_drift_net()


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    repo = tmp_path_factory.mktemp("drift")
    export_model(trained, torch.randn(4, 3, 9, 9), repository=repo, name="net")
    with ServiceProcess(repo, env={"BNSERVE_DEBUG_TOKEN": TOKEN}) as process:
        yield process


def stat_drift(url: str, x: np.ndarray, *, name="net", token=TOKEN, binary=False, **parameters):
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32"}
    headers = {"authorization": f"Bearer {token}"} if token else {}
    body = {"inputs": [tensor], "parameters": parameters}
    if binary:
        tensor["parameters"] = {"binary_data_size": x.nbytes}
        header = orjson.dumps(body)
        headers["inference-header-content-length"] = str(len(header))
        content = header + x.tobytes()
    else:
        tensor["data"] = x.reshape(-1).tolist()
        content = orjson.dumps(body)
    return httpx.post(f"{url}/v2/models/{name}/stat-drift", content=content, headers=headers)


def hooked_statistics(
    model: nn.Module, x: torch.Tensor
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel mean and biased variance of every BN's input, via forward pre-hooks."""
    taken, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):

            def hook(_m, args, name=name):
                t = args[0].detach().double()
                dims = [0, *range(2, t.dim())]
                taken[name] = (t.mean(dims).numpy(), t.var(dims, unbiased=False).numpy())

            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        out = model(x)
    for h in handles:
        h.remove()
    return taken, out.numpy()


def rel_error(got, expected) -> float:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-12))


@pytest.mark.parametrize("binary", [False, True])
def test_batch_and_global_paths_match_pytorch_train_and_eval(server, trained, binary):
    x = (torch.randn(16, 3, 9, 9) * 3 - 2).numpy()
    response = stat_drift(server.url, x, binary=binary, return_outputs=True, return_statistics=True)
    assert response.status_code == 200, response.text
    report = response.json()

    eval_stats, eval_out = hooked_statistics(trained, torch.from_numpy(x))
    train_copy = copy.deepcopy(trained).train()
    train_stats, train_out = hooked_statistics(train_copy, torch.from_numpy(x))

    served = report["global_outputs"][0]
    batch = report["batch_outputs"][0]
    assert rel_error(np.reshape(served["data"], served["shape"]), eval_out) <= 1e-4
    assert rel_error(np.reshape(batch["data"], batch["shape"]), train_out) <= 1e-4
    assert rel_error(train_out, eval_out) > 1e-2  # the two paths really differ here

    assert [layer["name"] for layer in report["layers"]] == BN_NAMES
    modules = dict(trained.named_modules())
    for layer in report["layers"]:
        name = layer["name"]
        for path, stats in (("global", eval_stats), ("batch", train_stats)):
            mean, var = stats[name]
            assert rel_error(layer[path]["mean"], mean) <= 1e-4, (name, path)
            assert rel_error(layer[path]["var"], var) <= 1e-4, (name, path)
        np.testing.assert_allclose(
            layer["running_mean"], modules[name].running_mean.numpy(), rtol=1e-6
        )
        np.testing.assert_allclose(
            layer["running_var"], modules[name].running_var.numpy(), rtol=1e-6
        )
        # The documented figures, recomputed from the documented formulas.
        mean, var = eval_stats[name]
        rm, rv = (
            modules[name].running_mean.double().numpy(),
            modules[name].running_var.double().numpy(),
        )
        eps = modules[name].eps
        shift = np.abs(mean - rm) / np.sqrt(rv + eps)
        w2 = np.sqrt((mean - rm) ** 2 + (np.sqrt(var) - np.sqrt(rv)) ** 2) / np.sqrt(rv + eps)
        assert layer["global"]["mean_shift_mean"] == pytest.approx(shift.mean(), rel=1e-3)
        assert layer["global"]["wasserstein_max"] == pytest.approx(w2.max(), rel=1e-3)
        assert layer["global"]["log_var_ratio_mean"] == pytest.approx(
            np.log((var + eps) / (rv + eps)).mean(), rel=1e-3, abs=1e-4
        )
    # Training the copy moved its running stats; the served model's must not have moved.
    assert not torch.equal(
        dict(train_copy.named_modules())["bn1"].running_mean, modules["bn1"].running_mean
    )

    comparison = report["outputs"][0]
    diff = np.abs(train_out.astype(np.float64) - eval_out)
    assert comparison["max_abs_diff"] == pytest.approx(diff.max(), rel=1e-3)
    agreement = np.mean(train_out.argmax(1) == eval_out.argmax(1))
    assert comparison["argmax_agreement"] == pytest.approx(agreement)


def test_batch_of_one_is_refused_only_where_a_layer_gets_one_value(server):
    response = stat_drift(server.url, np.zeros((1, 3, 9, 9), np.float32))
    assert response.status_code == 400
    error = response.json()["error"]
    assert "head_bn" in error
    assert "batch of at least 2" in error
    assert stat_drift(server.url, np.ones((2, 3, 9, 9), np.float32)).status_code == 200


def test_debug_endpoints_need_the_token(server):
    x = np.zeros((2, 3, 9, 9), np.float32)
    assert stat_drift(server.url, x, token=None).status_code == 401
    assert stat_drift(server.url, x, token="wrong").status_code == 401
    assert httpx.get(f"{server.url}/v2/models/net/stat-drift/samples").status_code == 401


def test_debug_endpoints_can_be_turned_off(demo_repository):
    with ServiceProcess(demo_repository, env={"BNSERVE_DEBUG_ENDPOINTS": "false"}) as process:
        x = np.zeros((2, 1, 8, 8), np.float32)
        body = {
            "inputs": [
                {
                    "name": "images",
                    "shape": [2, 1, 8, 8],
                    "datatype": "FP32",
                    "data": x.reshape(-1).tolist(),
                }
            ]
        }
        response = httpx.post(f"{process.url}/v2/models/digits/stat-drift", json=body)
        assert response.status_code == 404
        assert "turned off" in response.json()["error"]
        assert httpx.get(f"{process.url}/v2/models/digits/stat-drift/view").status_code == 404
        assert httpx.post(f"{process.url}/v2/models/digits/infer", json=body).status_code == 200


@pytest.fixture(scope="module")
def digits_reports(digits_server, demo_repository):
    folder = demo_repository / "digits" / "1" / "samples"
    reports = {}
    for name in ("in_distribution", "inverted", "brightened"):
        response = httpx.post(
            f"{digits_server.url}/v2/models/digits/stat-drift",
            content=(folder / f"{name}.json").read_bytes(),
        )
        assert response.status_code == 200, response.text
        reports[name] = response.json()
    return reports


def test_digits_in_distribution_batch_reads_ok(digits_reports):
    summary = digits_reports["in_distribution"]["summary"]
    assert summary["verdict"] == "ok", summary
    assert summary["drifted_layers"] == []
    assert digits_reports["in_distribution"]["outputs"][0]["argmax_agreement"] > 0.9


@pytest.mark.parametrize("shift", ["inverted", "brightened"])
def test_digits_shifted_batches_read_drift_with_the_input_layer_flagged(digits_reports, shift):
    report = digits_reports[shift]
    summary = report["summary"]
    assert summary["verdict"] == "drift", summary
    assert summary["most_drifted"][0] == "input_bn"
    assert "input_bn" in summary["drifted_layers"]
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert layers["input_bn"]["global"]["mean_shift_mean"] > 0.9
    # Train mode re-normalizes the shifted input, which hides the shift from later layers.
    assert layers["bn1"]["batch"]["wasserstein_mean"] < layers["bn1"]["global"]["wasserstein_mean"]


def test_samples_are_listed_and_served(digits_server):
    names = httpx.get(f"{digits_server.url}/v2/models/digits/stat-drift/samples").json()
    assert sorted(names) == ["brightened", "in_distribution", "inverted"]
    sample = httpx.get(f"{digits_server.url}/v2/models/digits/stat-drift/samples/inverted")
    assert sample.json()["inputs"][0]["shape"] == [64, 1, 8, 8]
    missing = httpx.get(f"{digits_server.url}/v2/models/digits/stat-drift/samples/..%2Fmodel")
    assert missing.status_code == 404
