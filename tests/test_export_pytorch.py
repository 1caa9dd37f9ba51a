"""The PyTorch path's hard cases, each proved against PyTorch run here (eval forward, train
forward, or statistics computed here in float64), never against the figures the exporter reports.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import export
from export import repository as repository_module

PARITY = 1e-4  # relative to the largest |output| (export/verify.py)
INDEPENDENCE = 1e-5
BatchNorm = nn.modules.batchnorm._BatchNorm

REMOVED_BY = {
    "folded_into_conv",
    "folded_into_conv_transpose",
    "folded_into_gemm",
    "folded_into_matmul",
    "folded_forward_into_conv",
    "folded_forward_into_gemm",
    "folded_forward_into_matmul",
    "rewritten_as_affine",
    "per_sample_normalization",
}


# -- helpers ----------------------------------------------------------------------------------


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters in every BatchNorm."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.uniform_(-1.0, 1.0, generator=gen)
                    m.running_var.uniform_(0.2, 2.0, generator=gen)
                    m.num_batches_tracked.fill_(int(torch.randint(1, 999, (), generator=gen)))
                if m.affine:
                    m.weight.uniform_(0.5, 1.5, generator=gen)
                    m.bias.uniform_(-1.0, 1.0, generator=gen)
    return model


def rel_error(got: np.ndarray, expected: np.ndarray) -> float:
    assert got.shape == expected.shape, (got.shape, expected.shape)
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-12)
    return float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max()) / scale


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_onnx(path: Path, *inputs: torch.Tensor) -> list[np.ndarray]:
    s = session(path)
    feeds = {meta.name: x.numpy() for meta, x in zip(s.get_inputs(), inputs, strict=True)}
    return s.run(None, feeds)


def eval_forward(model: nn.Module, *inputs: torch.Tensor) -> list[np.ndarray]:
    """The oracle: an eval forward of a copy (the caller's model is never put in eval here)."""
    work = copy.deepcopy(model).eval()
    with torch.no_grad():
        out = work(*inputs)
    items = out if isinstance(out, tuple) else (out,)
    return [t.numpy() for t in items]


def state_bytes(model: nn.Module) -> dict[str, tuple[str, tuple, bytes]]:
    return {
        k: (str(v.dtype), tuple(v.shape), v.detach().cpu().contiguous().numpy().tobytes())
        for k, v in model.state_dict().items()
    }


def flags(model: nn.Module) -> list[tuple[str, bool]]:
    return [(name, m.training) for name, m in model.named_modules()]


def tree(path: Path) -> list[str]:
    if not path.exists():
        return []
    return sorted(
        f"{p.relative_to(path)}:{p.stat().st_size if p.is_file() else 'dir'}"
        for p in path.rglob("*")
    )


def bn_node_count(path: Path) -> int:
    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)


def capture_inputs(model: nn.Module, names) -> tuple[dict[str, torch.Tensor], list]:
    """Forward pre-hooks that keep the first input each named module gets, in float64."""
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_module, args) -> None:
            captured.setdefault(name, args[0].detach().double())

        return record

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    return captured, handles


def seeded(*shape: int, seed: int = 0, scale: float = 2.0, shift: float = 0.5) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale + shift


class ConvNet(nn.Module):
    def __init__(self, momentum: float | None = 0.1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8, momentum=momentum)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(8, momentum=momentum)
        self.fc = nn.Linear(8, 5)
        self.bn3 = nn.BatchNorm1d(5, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.fc(x.mean(dim=(2, 3))))


def tiny() -> nn.Module:
    return randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).eval()


# -- (a) a model given in train mode ----------------------------------------------------------


def test_train_mode_model_is_left_untouched_and_exported_in_eval_mode(tmp_path):
    """The seed thread: BNs "frozen" with momentum=0 keep their running statistics in train
    mode, yet train mode still normalizes with batch statistics, so the output differs."""
    model = randomize(ConvNet(momentum=0.0), seed=1).train()
    before_state, before_flags = state_bytes(model), flags(model)
    assert all(training for _, training in before_flags)
    example, fresh = seeded(4, 3, 12, 12, seed=1), seeded(6, 3, 12, 12, seed=2)

    with pytest.warns(UserWarning, match="train mode"):
        report = export.export_model(model, example, repository=tmp_path, name="frozen")

    assert flags(model) == before_flags  # every submodule still in train mode
    assert state_bytes(model) == before_state  # bit for bit, num_batches_tracked included
    assert any("train mode" in w for w in report.warnings)
    assert report.verification.source_model_untouched is True

    got = run_onnx(Path(report.path) / "model.onnx", fresh)[0]
    assert rel_error(got, eval_forward(model, fresh)[0]) <= PARITY

    # Train mode on the same inputs: running statistics stay equal (momentum 0) but the output
    # is not the exported one.
    trained = copy.deepcopy(model)
    with torch.no_grad():
        train_out = trained(fresh).numpy()
    for name, bn in trained.named_modules():
        if isinstance(bn, BatchNorm):
            original = model.get_submodule(name)
            assert torch.equal(bn.running_mean, original.running_mean)
            assert torch.equal(bn.running_var, original.running_var)
    assert rel_error(train_out, got) > 1e-2


def test_mixed_training_flags_are_preserved(tmp_path):
    model = randomize(ConvNet(), seed=3).train()
    model.bn2.eval()
    model.fc.eval()
    before_flags, before_state = flags(model), state_bytes(model)
    with pytest.warns(UserWarning, match="train mode"):
        export.export_model(model, seeded(2, 3, 8, 8), repository=tmp_path, name="mixed")
    assert flags(model) == before_flags
    assert state_bytes(model) == before_state


# -- (b) track_running_stats=False --------------------------------------------------------------


class Pix2Pix(nn.Module):
    """Generator-style network whose norms use batch statistics (track_running_stats=False)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 8, 4, stride=2, padding=1),
            nn.BatchNorm2d(8, track_running_stats=False),
            nn.LeakyReLU(0.2),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),  # an ordinary layer beside them
            nn.ReLU(),
            nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1),
            nn.BatchNorm2d(4, track_running_stats=False, affine=False),
            nn.Tanh(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


UNTRACKED = ["encoder.1", "decoder.4"]


def test_untracked_layers_stop_the_export_by_default(tmp_path):
    model = randomize(Pix2Pix()).eval()
    repository = tmp_path / "repo"
    with pytest.raises(export.BatchStatisticsError) as info:
        export.export_model(model, seeded(2, 3, 16, 16), repository=repository, name="pix")
    assert info.value.layers == UNTRACKED
    message = str(info.value)
    assert "\n" not in message
    for name in UNTRACKED:
        assert name in message
    assert "instance" in message
    assert "calibrate" in message
    assert not repository.exists()


def test_instance_statistics_equal_each_sample_run_alone(tmp_path):
    model = randomize(Pix2Pix()).eval()
    before = state_bytes(model)
    report = export.export_model(
        model, seeded(3, 3, 16, 16), repository=tmp_path, name="pix", batch_stats="instance"
    )
    assert state_bytes(model) == before
    assert all(type(model.get_submodule(n)) is nn.BatchNorm2d for n in UNTRACKED)
    path = Path(report.path) / "model.onnx"
    assert bn_node_count(path) == 0

    fresh = seeded(5, 3, 16, 16, seed=9)
    got = run_onnx(path, fresh)[0]
    for i in range(len(fresh)):
        # Eval mode at batch size 1 normalizes untracked layers with this sample's statistics,
        # as train mode at batch size 1 does.
        alone = eval_forward(model, fresh[i : i + 1])[0]
        assert rel_error(got[i : i + 1], alone) <= PARITY
        onnx_alone = run_onnx(path, fresh[i : i + 1])[0]
        assert rel_error(onnx_alone, got[i : i + 1]) <= INDEPENDENCE

    layers = {layer.name: layer for layer in report.batch_norm}
    for name in UNTRACKED:
        assert layers[name].statistics == "instance"
        assert layers[name].removed_by == "per_sample_normalization"
        assert layers[name].track_running_stats is False
    assert layers["decoder.1"].statistics == "running"


def test_instance_statistics_on_batchnorm1d_over_n_c_is_refused(tmp_path):
    model = nn.Sequential(
        nn.Linear(6, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.ReLU()
    ).eval()
    repository = tmp_path / "repo"
    with pytest.raises(export.ExportError) as info:
        export.export_model(
            model, seeded(3, 6), repository=repository, name="mlp", batch_stats="instance"
        )
    message = str(info.value)
    assert "'1'" in message
    assert "calibrate" in message
    assert "\n" not in message
    assert not repository.exists()


class CalibrationNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(6, track_running_stats=False)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)
        self.norm3 = nn.BatchNorm1d(4, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.norm3(self.fc(x.mean(dim=(2, 3))))


def with_population_statistics(model: nn.Module, names: list[str], data: torch.Tensor):
    """A copy whose untracked layers get the mean and biased variance of their input over the
    whole calibration set, computed here in float64 from one eval forward over all of it (an
    untracked layer normalizes with exactly those statistics on that batch)."""
    work = copy.deepcopy(model).eval()
    captured, handles = capture_inputs(work, names)
    with torch.no_grad():
        work(data)
    for h in handles:
        h.remove()
    for name in names:
        old, x = work.get_submodule(name), captured[name]
        dims = [0, *range(2, x.dim())]
        new = type(old)(old.num_features, eps=old.eps, momentum=old.momentum, affine=old.affine)
        with torch.no_grad():
            if old.affine:
                new.weight.copy_(old.weight)
                new.bias.copy_(old.bias)
            new.running_mean.copy_(x.mean(dims).float())
            new.running_var.copy_(x.var(dims, unbiased=False).float())
        work.set_submodule(name, new.eval())
    return work


def test_calibrate_gives_untracked_layers_population_statistics(tmp_path):
    model = randomize(CalibrationNet(), seed=4).eval()
    calibration = seeded(150, 3, 8, 8, seed=5)
    report = export.export_model(
        model,
        seeded(2, 3, 8, 8, seed=6),
        repository=tmp_path,
        name="calibrated",
        batch_stats="calibrate",
        calibration=calibration,
    )
    oracle = with_population_statistics(model, ["norm1", "norm3"], calibration)
    path = Path(report.path) / "model.onnx"
    assert bn_node_count(path) == 0
    for data in (seeded(7, 3, 8, 8, seed=7), calibration[:20]):
        with torch.no_grad():
            expected = oracle(data).numpy()
        assert rel_error(run_onnx(path, data)[0], expected) <= PARITY
    statistics = {layer.name: layer.statistics for layer in report.batch_norm}
    assert statistics == {"norm1": "calibrated", "bn2": "running", "norm3": "calibrated"}


@pytest.mark.parametrize(
    "options",
    [{"batch_stats": "calibrate"}, {"recalibrate": True}],
    ids=["calibrate", "recalibrate"],
)
def test_missing_calibration_data_is_a_clear_error(tmp_path, options):
    model = randomize(CalibrationNet()).eval()
    repository = tmp_path / "repo"
    with pytest.raises(export.InvalidInputError, match="calibration") as info:
        export.export_model(model, seeded(2, 3, 8, 8), repository=repository, name="c", **options)
    assert "\n" not in str(info.value)
    assert not repository.exists()


# -- (c) recalibrate=True (PreciseBN) -----------------------------------------------------------


class RecalibrationNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_bn = nn.BatchNorm2d(3)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(8, momentum=None)
        self.fc = nn.Linear(8, 6)
        self.bn3 = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_bn(x)
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x))) + x[:, :, ::2, ::2]
        return self.out(torch.relu(self.bn3(self.fc(x.mean(dim=(2, 3))))))


def execution_order(model: nn.Module, data: torch.Tensor) -> list[str]:
    order: list[str] = []
    handles = [
        m.register_forward_pre_hook(lambda _m, _a, name=name: order.append(name))
        for name, m in model.named_modules()
        if isinstance(m, BatchNorm)
    ]
    with torch.no_grad():
        model(data)
    for h in handles:
        h.remove()
    return order


def sequential_population_statistics(model: nn.Module, data: torch.Tensor):
    """PreciseBN computed here: layer by layer in execution order, each from an eval forward
    over the whole calibration set as one batch with the layers before it already set."""
    work = copy.deepcopy(model).eval()
    statistics = {}
    for name in execution_order(work, data):
        bn = work.get_submodule(name)
        captured, handles = capture_inputs(work, [name])
        with torch.no_grad():
            work(data)
        handles[0].remove()
        x = captured[name]
        dims = [0, *range(2, x.dim())]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        with torch.no_grad():
            bn.running_mean.copy_(mean.float())
            bn.running_var.copy_(var.float())
        statistics[name] = (mean.numpy(), var.numpy())
    return work, statistics


def reference_statistics(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Running mean and variance of every BatchNormalization in reference.onnx, by module path
    (torch.onnx names the initializers <module path>.running_mean)."""
    graph = onnx.load(str(path)).graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    found = {}
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            mean_name, var_name = node.input[3], node.input[4]
            assert mean_name.endswith(".running_mean"), mean_name
            found[mean_name.removesuffix(".running_mean")] = (
                values[mean_name].copy(),
                values[var_name].copy(),
            )
    return found


def test_recalibrate_computes_exact_population_statistics(tmp_path):
    model = randomize(RecalibrationNet(), seed=11).eval()
    before = state_bytes(model)
    images = seeded(150, 3, 10, 10, seed=12, scale=3.0, shift=1.0)
    loader = DataLoader(TensorDataset(images, torch.zeros(150)), batch_size=32)  # (x, y) pairs
    report = export.export_model(
        model,
        seeded(2, 3, 10, 10, seed=13),
        repository=tmp_path,
        name="precise",
        calibration=loader,
        recalibrate=True,
    )
    assert state_bytes(model) == before  # the caller's statistics are not changed

    oracle, expected = sequential_population_statistics(model, images)
    stored = reference_statistics(Path(report.path) / "reference.onnx")
    assert set(stored) == set(expected) == {"input_bn", "bn1", "bn2", "bn3"}
    for name, (mean, var) in expected.items():
        np.testing.assert_allclose(stored[name][0], mean, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(stored[name][1], var, rtol=1e-5, atol=1e-5, err_msg=name)
    assert {layer.statistics for layer in report.batch_norm} == {"recalibrated"}

    # With the exported statistics, every layer's input on the calibration data is normalized.
    exported = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, (mean, var) in stored.items():
            exported.get_submodule(name).running_mean.copy_(torch.from_numpy(mean))
            exported.get_submodule(name).running_var.copy_(torch.from_numpy(var))
    inputs, handles = capture_inputs(exported, stored)
    with torch.no_grad():
        exported(images)
    for h in handles:
        h.remove()
    for name, x in inputs.items():
        mean, var = (torch.from_numpy(v).double() for v in stored[name])
        shape = (1, -1, *[1] * (x.dim() - 2))
        z = (x - mean.reshape(shape)) / var.sqrt().reshape(shape)
        dims = [0, *range(2, z.dim())]
        assert z.mean(dims).abs().max().item() < 1e-4, name
        assert (z.var(dims, unbiased=False) - 1).abs().max().item() < 1e-4, name

    fresh = seeded(5, 3, 10, 10, seed=14)
    with torch.no_grad():
        want = oracle(fresh).numpy()
    assert rel_error(run_onnx(Path(report.path) / "model.onnx", fresh)[0], want) <= PARITY


# -- (d) nested module names ------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + identity)


class ResNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.layer1 = nn.Sequential(Block(8, 8), Block(8, 8))
        self.layer2 = nn.Sequential(Block(8, 16, stride=2))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = self.layer2(self.layer1(x))
        return self.fc(x.mean(dim=(2, 3)))


def test_nested_module_paths_name_the_layers_in_model_json(tmp_path):
    model = randomize(ResNetish(), seed=21)
    bns = [(name, m) for name, m in model.named_modules() if isinstance(m, BatchNorm)]
    for i, (_, bn) in enumerate(bns):  # distinct settings, so a mix-up shows
        bn.eps = 1e-5 * (i + 1)
        bn.momentum = [0.1, None, 0.01][i % 3]
        bn.num_batches_tracked.fill_(100 + i)
    model.eval()
    report = export.export_model(model, seeded(2, 3, 8, 8), repository=tmp_path, name="resnet")
    card = json.loads((Path(report.path) / "model.json").read_text())
    entries = card["batch_norm"]
    assert [e["name"] for e in entries] == [name for name, _ in bns]  # model order
    assert {"layer1.0.bn1", "layer1.1.bn2", "layer2.0.downsample.1", "stem.1"} <= {
        e["name"] for e in entries
    }
    for entry, (_, bn) in zip(entries, bns, strict=True):
        assert entry["channels"] == bn.num_features
        assert entry["eps"] == pytest.approx(bn.eps, rel=1e-9)
        assert entry["momentum"] == bn.momentum
        assert entry["num_batches_tracked"] == int(bn.num_batches_tracked)
        assert entry["removed_by"] in REMOVED_BY
    fresh = seeded(3, 3, 8, 8, seed=22)
    got = run_onnx(Path(report.path) / "model.onnx", fresh)[0]
    assert rel_error(got, eval_forward(model, fresh)[0]) <= PARITY


class SharedNorm(nn.Module):
    """One BatchNorm module applied twice: two nodes, both removed, both reported."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(torch.relu(self.norm(x))))


def test_a_module_applied_twice_is_removed_at_both_uses(tmp_path):
    model = randomize(SharedNorm(), seed=5).eval()
    report = export.export_model(model, seeded(2, 4, 6, 6), repository=tmp_path, name="shared")
    names = [layer.name for layer in report.batch_norm]
    assert len(names) == 2
    assert all(name.split("#")[0] == "norm" for name in names)
    assert all(layer.channels == 4 for layer in report.batch_norm)
    fresh = seeded(3, 4, 6, 6, seed=6)
    got = run_onnx(Path(report.path) / "model.onnx", fresh)[0]
    assert rel_error(got, eval_forward(model, fresh)[0]) <= PARITY


# -- (e) several inputs and outputs -----------------------------------------------------------


class TwoTower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image_net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU())
        self.meta_bn = nn.BatchNorm1d(5)  # input-side BN on the second input
        self.meta_fc = nn.Linear(5, 6)
        self.meta_out_bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(12, 4)

    def forward(self, image: torch.Tensor, meta: torch.Tensor):
        a = self.image_net(image).mean(dim=(2, 3))
        b = torch.relu(self.meta_out_bn(self.meta_fc(self.meta_bn(meta))))
        return self.head(torch.cat([a, b], dim=1)), a


def test_several_inputs_and_outputs(tmp_path):
    model = randomize(TwoTower(), seed=31).eval()
    example = (seeded(3, 3, 7, 7, seed=1), seeded(3, 5, seed=2))
    report = export.export_model(model, example, repository=tmp_path, name="towers")
    assert [(i.name, i.datatype, i.shape) for i in report.inputs] == [
        ("image", "FP32", [-1, 3, 7, 7]),
        ("meta", "FP32", [-1, 5]),
    ]
    assert [(o.datatype, o.shape) for o in report.outputs] == [("FP32", [-1, 4]), ("FP32", [-1, 6])]
    fresh = (seeded(5, 3, 7, 7, seed=3), seeded(5, 5, seed=4))
    path = Path(report.path) / "model.onnx"
    got = run_onnx(path, *fresh)
    expected = eval_forward(model, *fresh)
    assert len(got) == 2
    for g, e in zip(got, expected, strict=True):
        assert rel_error(g, e) <= PARITY
    for i in range(5):
        alone = run_onnx(path, *(x[i : i + 1] for x in fresh))
        for a, g in zip(alone, got, strict=True):
            assert rel_error(a, g[i : i + 1]) <= INDEPENDENCE
    assert bn_node_count(path) == 0


# -- (f) bad input ----------------------------------------------------------------------------


def _bad_wrong_shape(repo):
    export.export_model(tiny(), seeded(2, 5, 8, 8), repository=repo, name="m")


def _bad_not_a_module(repo):
    export.export_model(lambda x: x, seeded(2, 3, 8, 8), repository=repo, name="m")


def _bad_no_batch_axis(repo):
    export.export_model(tiny(), torch.tensor(1.0), repository=repo, name="m")


def _bad_labels(repo):
    export.export_model(tiny(), seeded(2, 3, 8, 8), repository=repo, name="m", labels=["a", "b"])


def _bad_batch_stats(repo):
    export.export_model(tiny(), seeded(2, 3, 8, 8), repository=repo, name="m", batch_stats="x")


def _bad_name(repo):
    export.export_model(tiny(), seeded(2, 3, 8, 8), repository=repo, name="../escape")


@pytest.mark.parametrize(
    "attempt",
    [
        _bad_wrong_shape,
        _bad_not_a_module,
        _bad_no_batch_axis,
        _bad_labels,
        _bad_batch_stats,
        _bad_name,
    ],
    ids=lambda f: f.__name__.removeprefix("_bad_"),
)
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, attempt):
    repository = tmp_path / "repo"
    with pytest.raises(export.InvalidInputError) as info:
        attempt(repository)
    message = str(info.value)
    assert "\n" not in message
    assert "expected" in message
    assert not repository.exists()
    assert tree(tmp_path) == []


def test_wrong_shape_error_says_what_was_given(tmp_path):
    with pytest.raises(export.InvalidInputError, match=r"\(2, 5, 8, 8\)"):
        _bad_wrong_shape(tmp_path / "repo")


def test_existing_version_is_refused_and_left_as_it_was(tmp_path):
    export.export_model(tiny(), seeded(2, 3, 8, 8), repository=tmp_path, name="m", version=3)
    before = tree(tmp_path)
    hashes = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(export.InvalidInputError, match="already exists"):
        export.export_model(tiny(), seeded(2, 3, 8, 8), repository=tmp_path, name="m", version=3)
    assert tree(tmp_path) == before
    assert all(p.read_bytes() == data for p, data in hashes.items())


# -- (g) the repository is written atomically -------------------------------------------------


def _fail_on_model_json(original):
    def write(path, data):
        if Path(path).name == "model.json":
            raise OSError("disk full (injected)")
        original(path, data)

    return write


@pytest.mark.parametrize("existing", [False, True], ids=["new_model", "existing_model"])
@pytest.mark.parametrize("failure", ["write", "rename"])
def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch, existing, failure):
    if existing:
        export.export_model(tiny(), seeded(2, 3, 8, 8), repository=tmp_path, name="m")
    before = tree(tmp_path)
    if failure == "write":
        monkeypatch.setattr(
            repository_module, "_write", _fail_on_model_json(repository_module._write)
        )
    else:

        def rename(*_args):
            raise OSError("rename failed (injected)")

        monkeypatch.setattr(repository_module.os, "rename", rename)
    with pytest.raises(export.ExportError, match="injected"):  # one line, not a traceback
        export.export_model(tiny(), seeded(2, 3, 8, 8), repository=tmp_path, name="m")
    monkeypatch.undo()
    assert tree(tmp_path) == before
    assert not list(tmp_path.rglob(".staging*"))


def test_versions_are_numbered_in_order(tmp_path):
    model, example = tiny(), seeded(2, 3, 8, 8)
    versions = [
        export.export_model(model, example, repository=tmp_path, name="m").version for _ in range(3)
    ]
    assert versions == [1, 2, 3]
    assert (
        export.export_model(model, example, repository=tmp_path, name="m", version=7).version == 7
    )
    report = export.export_model(model, example, repository=tmp_path, name="m")
    assert report.version == 8
    assert Path(report.path) == tmp_path / "m" / "8"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "2", "3", "7", "8"]


# -- (h) the repository contract (models/README.md) -------------------------------------------

CARD_KEYS = {
    "format",
    "name",
    "version",
    "created",
    "description",
    "source",
    "producer",
    "opset",
    "inputs",
    "outputs",
    "batch_norm",
    "affine_folds",
    "constant_folds",
    "verification",
    "files",
    "samples",
    "serving",
    "recalibration",
}
LAYER_KEYS = {
    "name",
    "onnx_node",
    "channels",
    "eps",
    "momentum",
    "num_batches_tracked",
    "track_running_stats",
    "affine",
    "statistics",
    "removed_by",
    "folded_into",
    "note",
}
VERIFICATION_KEYS = {
    "oracle",
    "samples",
    "parity_max_abs_error",
    "parity_rel_error",
    "reference_rel_error",
    "float64_rel_error",
    "source_float32_rel_error",
    "reference_float64_rel_error",
    "parity_rule",
    "parity_tolerance_override",
    "batch_independence_rel_error",
    "batch_independence_bitwise",
    "batch_norm_nodes_left",
    "source_model_untouched",
    "tolerances",
    "execution_provider",
}
V2_DATATYPES = {"FP32", "FP16", "BF16", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8"}


def test_model_json_and_graphs_follow_the_documented_contract(tmp_path):
    model = randomize(ConvNet(), seed=41).eval()
    report = export.export_model(
        model,
        seeded(4, 3, 8, 8),
        repository=tmp_path,
        name="contract",
        labels=["a", "b", "c", "d", "e"],
        samples={"batch": seeded(2, 3, 8, 8, seed=5)},
        description="a model for the contract test",
    )
    version = tmp_path / "contract" / "1"
    assert Path(report.path) == version
    assert sorted(str(p.relative_to(version)) for p in version.rglob("*") if p.is_file()) == [
        "model.json",
        "model.onnx",
        "reference.onnx",
        "samples/batch.json",
    ]
    card = json.loads((version / "model.json").read_text())
    assert set(card) == CARD_KEYS
    assert card["format"] == "bnserve.model-card/1"
    assert (card["name"], card["version"], card["source"]) == ("contract", 1, "pytorch")
    assert card["description"] == "a model for the contract test"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", card["created"])
    assert card["producer"]["torch"] == torch.__version__
    assert card["producer"]["onnx"] == onnx.__version__
    folded, reference = (
        onnx.load(str(version / "model.onnx")),
        onnx.load(str(version / "reference.onnx")),
    )
    opset = next(o.version for o in folded.opset_import if o.domain in ("", "ai.onnx"))
    assert card["opset"] == opset

    for spec in card["inputs"] + card["outputs"]:
        assert spec["datatype"] in V2_DATATYPES
        assert spec["shape"][0] == -1
    assert card["inputs"][0]["name"] == "x"
    assert card["inputs"][0]["shape"] == [-1, 3, 8, 8]
    assert card["outputs"][0]["shape"] == [-1, 5]
    assert card["outputs"][0]["labels"] == ["a", "b", "c", "d", "e"]

    reference_nodes = {n.name: n for n in reference.graph.node if n.op_type == "BatchNormalization"}
    assert len(card["batch_norm"]) == 3
    for layer in card["batch_norm"]:
        assert set(layer) == LAYER_KEYS
        assert layer["removed_by"] in REMOVED_BY
        assert layer["statistics"] in {"running", "recalibrated", "calibrated", "instance"}
        assert layer["onnx_node"] in reference_nodes
    assert set(card["verification"]) == VERIFICATION_KEYS
    assert card["verification"]["oracle"] == "pytorch-eval"
    assert card["verification"]["batch_norm_nodes_left"] == 0
    for item in card["affine_folds"]:
        assert set(item) == {"node", "op_type", "into"}

    for filename in ("model.onnx", "reference.onnx"):
        data = (version / filename).read_bytes()
        assert card["files"][filename] == {
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        }
    assert card["samples"] == ["samples/batch.json"]
    body = json.loads((version / "samples" / "batch.json").read_text())
    assert body["inputs"][0]["name"] == "x"
    assert body["inputs"][0]["shape"] == [2, 3, 8, 8]
    assert body["inputs"][0]["datatype"] == "FP32"
    np.testing.assert_allclose(
        np.array(body["inputs"][0]["data"], dtype=np.float32),
        seeded(2, 3, 8, 8, seed=5).numpy().reshape(-1),
    )

    # model.onnx: one self-contained file, dynamic batch, no BatchNormalization.
    onnx.checker.check_model(folded, full_check=True)
    for tensor in folded.graph.initializer:
        assert tensor.data_location != onnx.TensorProto.EXTERNAL
        assert not tensor.external_data
    for value in [*folded.graph.input, *folded.graph.output]:
        first = value.type.tensor_type.shape.dim[0]
        assert first.dim_param
        assert not first.HasField("dim_value")
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]

    # reference.onnx: the same interface, eval-mode BatchNormalization nodes intact.
    assert [i.name for i in reference.graph.input] == [i.name for i in folded.graph.input]
    assert [o.name for o in reference.graph.output] == [o.name for o in folded.graph.output]
    assert len(reference_nodes) == 3
    for node in reference_nodes.values():
        modes = [a.i for a in node.attribute if a.name == "training_mode"]
        assert modes in ([], [0])
    x = seeded(3, 3, 8, 8, seed=8)
    assert rel_error(run_onnx(version / "reference.onnx", x)[0], eval_forward(model, x)[0]) <= 1e-5


# -- further cases found while testing --------------------------------------------------------


def test_conv3d_without_bias_then_batchnorm3d(tmp_path):
    """Conv3d(bias=False) + BatchNorm3d, as in 3D ResNets (torchvision r3d_18)."""
    model = randomize(
        nn.Sequential(nn.Conv3d(2, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4), nn.ReLU())
    ).eval()
    report = export.export_model(model, seeded(2, 2, 5, 5, 5), repository=tmp_path, name="c3d")
    fresh = seeded(3, 2, 5, 5, 5, seed=3)
    got = run_onnx(Path(report.path) / "model.onnx", fresh)[0]
    assert rel_error(got, eval_forward(model, fresh)[0]) <= PARITY
    assert report.batch_norm[0].removed_by == "folded_into_conv"


def test_bn_folds_forward_into_a_bias_free_unpadded_conv(tmp_path):
    """BN -> Conv(bias=False, padding=0): exact to fold forward (rule 4), and the usual way a
    bias-free conv comes out of torch.onnx must not stop it."""
    model = randomize(
        nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 5, 3, bias=False))
    ).eval()
    report = export.export_model(model, seeded(2, 3, 8, 8), repository=tmp_path, name="fwd")
    fresh = seeded(3, 3, 8, 8, seed=3)
    got = run_onnx(Path(report.path) / "model.onnx", fresh)[0]
    assert rel_error(got, eval_forward(model, fresh)[0]) <= PARITY
    assert report.batch_norm[0].removed_by == "folded_forward_into_conv"
    ops = [n.op_type for n in onnx.load(str(Path(report.path) / "model.onnx")).graph.node]
    assert ops == ["Relu", "Conv"]


def test_float64_model(tmp_path):
    """Rule 7 casts folded weights back to the model's dtype: a float64 model stays float64
    (an MLP: ONNX Runtime's CPU provider has no float64 Conv)."""
    model = nn.Sequential(
        nn.BatchNorm1d(6), nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)
    )
    model = randomize(model, seed=51).double().eval()
    report = export.export_model(model, seeded(4, 6).double(), repository=tmp_path, name="f64")
    assert report.inputs[0].datatype == "FP64"
    fresh = seeded(3, 6, seed=3).double()
    got = run_onnx(Path(report.path) / "model.onnx", fresh)[0]
    assert got.dtype == np.float64
    assert rel_error(got, eval_forward(model, fresh)[0]) <= 1e-8
