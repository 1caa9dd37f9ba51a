"""`python -m export recalibrate`: a version + a traffic capture -> the next version with exact
population BatchNorm statistics of that traffic.

The oracle is written here, independently of export/statistics.py: PyTorch in float64, forward
pre-hooks collecting every input of one BN layer at a time (execution order, earlier layers
already set), mean and biased variance over the concatenated values. The capture is written by
tests/captures.py from the documented format, so nothing here depends on the service.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from captures import write_capture
from conftest import ROOT, run_cli
from factories import INPUT_SHAPE, SmallNet, trained_weights
from onnx import numpy_helper

from export import export_model, fold_onnx

STATS_TOLERANCE = 1e-4
PARITY = 1e-4
SAMPLES = 300
LAYERS = ["input_bn", "bn1", "bn2", "post_bn", "head_bn"]

# A prelude after which `import torch` (and torch.*) fails in this process.
BLOCK_TORCH = """
import runpy, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this process")
sys.meta_path.insert(0, NoTorch())
"""
# `python -m export ...` behind that prelude.
WITHOUT_TORCH = (
    BLOCK_TORCH
    + """
sys.argv = ["export", *sys.argv[1:]]
runpy.run_module("export", run_name="__main__", alter_sys=True)
"""
)


def shifted_traffic(samples: int, seed: int) -> np.ndarray:
    """Not what the statistics were set for: a brighter, wider, per-channel shifted input."""
    rng = np.random.default_rng(seed)
    x = (
        rng.standard_normal((samples, *INPUT_SHAPE)) * 1.8
        + np.array([0.7, -0.4, 1.5])[:, None, None]
    )
    return x.astype(np.float32)


def tree(path: Path) -> list[str]:
    return sorted(
        f"{p.relative_to(path)}:{p.stat().st_size if p.is_file() else 'dir'}"
        for p in path.rglob("*")
    )


def rel_error(got: np.ndarray, expected: np.ndarray) -> float:
    scale = max(float(np.abs(expected).max()), 1e-12)
    return float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max()) / scale


def source_model() -> SmallNet:
    model = SmallNet()
    model.load_state_dict(trained_weights())
    return model.eval()


def precise_bn_oracle(x: np.ndarray) -> SmallNet:
    """SmallNet in float64 with every BN given the population statistics of its input."""
    model = source_model().double()
    batches = [torch.from_numpy(x[i : i + 37]).double() for i in range(0, len(x), 37)]
    modules = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d)
    }
    order: list[str] = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, _a, n=n: order.append(n) if n not in order else None)
        for n, m in modules.items()
    ]
    with torch.no_grad():
        model(batches[0])
    for h in hooks:
        h.remove()
    for name in order:
        seen: list[torch.Tensor] = []
        hook = modules[name].register_forward_pre_hook(
            lambda _m, args, seen=seen: seen.append(args[0])
        )
        with torch.no_grad():
            for batch in batches:
                model(batch)
        hook.remove()
        values = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in seen], dim=1)
        modules[name].running_mean.copy_(values.mean(1))
        modules[name].running_var.copy_(values.var(1, unbiased=False))
    return model


def bn_statistics(version: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Running mean/var per layer name, read from reference.onnx's initializers."""
    card = json.loads((version / "model.json").read_text())
    names = {layer["onnx_node"]: layer["name"] for layer in card["batch_norm"]}
    reference = onnx.load(str(version / "reference.onnx"))
    init = {t.name: numpy_helper.to_array(t) for t in reference.graph.initializer}
    return {
        names[n.name]: (init[n.input[3]], init[n.input[4]])
        for n in reference.graph.node
        if n.op_type == "BatchNormalization"
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A repository with `small` v1 (from PyTorch) and `small_onnx` v1 (the same network given
    as an ONNX file), a capture of shifted traffic, and the oracle for it."""
    root = tmp_path_factory.mktemp("recalibrate")
    repository = root / "repo"
    model = source_model()
    example = torch.randn(4, *INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    export_model(model, example, repository=repository, name="small", output_names=["logits"])
    exported = root / "small.onnx"
    shutil.copy(repository / "small" / "1" / "reference.onnx", exported)
    fold_onnx(exported, repository=repository, name="small_onnx")
    checkpoint = root / "ckpt.pt"
    torch.save(trained_weights(), checkpoint)
    traffic = shifted_traffic(SAMPLES, seed=1)
    captures = root / "captures"
    capture = write_capture(captures, {"x": traffic}, model="small", capture_id="shifted")
    return {
        "root": root,
        "repository": repository,
        "checkpoint": checkpoint,
        "traffic": traffic,
        "capture": capture,
        "captures": captures,
        "oracle": precise_bn_oracle(traffic),
    }


def fresh_repository(base, name: str) -> Path:
    repository = base["root"] / f"repo_{name}"
    shutil.copytree(base["repository"], repository)
    return repository


def run_without_torch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def check_round_trip(version: Path, base, parent: Path) -> dict:
    oracle = base["oracle"]
    got = bn_statistics(version)
    assert sorted(got) == sorted(LAYERS)
    for name, (mean, var) in got.items():
        module = oracle.get_submodule(name)
        assert rel_error(mean, module.running_mean.numpy()) <= STATS_TOLERANCE, name
        assert rel_error(var, module.running_var.numpy()) <= STATS_TOLERANCE, name
    # v2 serves what the recalibrated PyTorch model computes, on traffic it was not measured on.
    held_out = shifted_traffic(64, seed=2)
    with torch.no_grad():
        expected = oracle(torch.from_numpy(held_out).double()).numpy()
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    assert rel_error(session.run(None, {"x": held_out})[0], expected) <= PARITY
    folded = onnx.load(str(version / "model.onnx"))
    assert "BatchNormalization" not in {n.op_type for n in folded.graph.node}

    card = json.loads((version / "model.json").read_text())
    record = card["recalibration"]
    assert record["parent_version"] == 1
    assert record["capture"] == {
        "capture_id": "shifted",
        "model": "small",
        "version": "1",
        "started": "2026-11-29T10:00:00Z",
        "stopped": "2026-11-29T10:05:00Z",
        "stop_reason": "stopped by admin",
        "samples": SAMPLES,
    }
    before = bn_statistics(parent)
    by_name = {layer["name"]: layer for layer in record["layers"]}
    assert sorted(by_name) == sorted(LAYERS)
    positions = {"input_bn": 16 * 16, "bn1": 16 * 16, "bn2": 8 * 8, "post_bn": 8 * 8, "head_bn": 1}
    for name, layer in by_name.items():
        assert layer["values_per_channel"] == SAMPLES * positions[name]
        np.testing.assert_allclose(layer["before"]["mean"], before[name][0], rtol=1e-6)
        np.testing.assert_allclose(layer["after"]["var"], got[name][1], rtol=1e-6)
        assert layer["mean_shift"] > 0
    assert all(layer["statistics"] == "recalibrated" for layer in card["batch_norm"])
    assert card["verification"]["batch_norm_nodes_left"] == 0
    return card


def test_onnx_sourced_model_without_torch(base):
    repository = fresh_repository(base, "onnx")
    before = tree(repository / "small_onnx" / "1")
    result = run_without_torch(
        "recalibrate",
        "--source",
        str(repository / "small_onnx" / "1"),
        "--calibration",
        str(base["capture"]),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    card = check_round_trip(repository / "small_onnx" / "2", base, repository / "small_onnx" / "1")
    assert card["recalibration"]["method"] == "onnxruntime"
    assert card["source"] == "onnx"
    assert card["verification"]["oracle"] == "reference.onnx"
    assert tree(repository / "small_onnx" / "1") == before  # the parent is never rewritten
    assert "recalibrated from v1" in result.stdout


def test_torch_really_is_blocked_in_that_process():
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + "import torch\n"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "torch is blocked" in result.stderr


def test_pytorch_sourced_model_through_onnx_runtime(base):
    """No factory given: a PyTorch-sourced version is recalibrated through its reference.onnx."""
    repository = fresh_repository(base, "pt_ort")
    result = run_without_torch(
        "recalibrate",
        "--source",
        str(repository / "small" / "1"),
        "--calibration",
        str(base["captures"]),  # the folder above the only capture
    )
    assert result.returncode == 0, result.stderr[-3000:]
    card = check_round_trip(repository / "small" / "2", base, repository / "small" / "1")
    assert card["recalibration"]["method"] == "onnxruntime"
    assert card["outputs"][0]["name"] == "logits"


def test_pytorch_sourced_model_through_pytorch(base):
    repository = fresh_repository(base, "pt")
    result = run_cli(
        "export",
        "recalibrate",
        "--source",
        str(repository / "small" / "1"),
        "--calibration",
        str(base["capture"]),
        "--factory",
        "factories:build_x",
        "--weights",
        str(base["checkpoint"]),
        "--version",
        "7",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    card = check_round_trip(repository / "small" / "7", base, repository / "small" / "1")
    assert card["recalibration"]["method"] == "pytorch"
    assert card["verification"]["oracle"] == "pytorch-eval"
    assert card["outputs"][0]["name"] == "logits"


# -- bad input: one error line, repository untouched --------------------------------------------


def _bad_inputs(base) -> dict[str, tuple[list[str], str]]:
    root = base["root"] / "bad"
    traffic = base["traffic"]
    source = str(base["repository"] / "small_onnx" / "1")

    def capture(name: str, arrays, **kw) -> str:
        return str(write_capture(root / name, arrays, capture_id=name, **kw))

    no_reference = root / "no_reference" / "small_onnx" / "1"
    shutil.copytree(base["repository"] / "small_onnx" / "1", no_reference)
    (no_reference / "reference.onnx").unlink()
    (root / "empty").mkdir(parents=True)
    malformed = Path(capture("malformed", {"x": traffic[:10]}))
    (malformed / "manifest.json").write_text('{"format": "bnserve-capture/1", "model": ')
    wrong_format = Path(capture("wrong_format", {"x": traffic[:10]}))
    manifest = json.loads((wrong_format / "manifest.json").read_text())
    del manifest["shards"]
    (wrong_format / "manifest.json").write_text(json.dumps(manifest))
    missing_shard = Path(capture("missing_shard", {"x": traffic[:10]}))
    (missing_shard / "shard-00000.x.npy").unlink()

    write_capture(root / "two", {"x": traffic[:10]}, capture_id="a")
    write_capture(root / "two", {"x": traffic[:10]}, capture_id="b")

    def calibrate(calibration: str, src: str = source) -> list[str]:
        return ["recalibrate", "--source", src, "--calibration", calibration]

    return {
        "wrong_shape": (
            calibrate(capture("wrong_shape", {"x": traffic[:, :, :8, :8].copy()})),
            "expected FP32 [3, 16, 16]",
        ),
        "wrong_dtype": (
            calibrate(capture("wrong_dtype", {"x": traffic.astype(np.float64)}, datatype="FP64")),
            "is FP64",
        ),
        "wrong_input_name": (
            calibrate(capture("wrong_name", {"images": traffic})),
            "expected the model's inputs ['x']",
        ),
        "too_few_samples": (
            calibrate(capture("one_sample", {"x": traffic[:1]})),
            "'head_bn' 1 value(s) per channel",
        ),
        "no_reference_onnx": (
            calibrate(str(base["capture"]), src=str(no_reference)),
            "has no reference.onnx",
        ),
        "no_manifest": (calibrate(str(root / "empty")), "holds no manifest.json"),
        "malformed_manifest": (calibrate(str(malformed)), "is malformed"),
        "manifest_without_shards": (calibrate(str(wrong_format)), "malformed at shards"),
        "missing_shard": (calibrate(str(missing_shard)), "cannot read capture shard"),
        "two_captures": (calibrate(str(root / "two")), "2 captures below it"),
        "factory_without_torch": (
            [*calibrate(str(base["capture"])), "--factory", "factories:build_x"],
            "cannot be imported here",
        ),
    }


@pytest.fixture(scope="module")
def bad_runs(base):
    cases = _bad_inputs(base)
    repository = base["repository"]
    before = tree(repository)

    def run_one(args):
        return run_without_torch(*args)

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(cases, pool.map(run_one, [a for a, _ in cases.values()]), strict=True))
    return {name: (results[name], cases[name][1]) for name in cases}, before


BAD_CASES = [
    "wrong_shape",
    "wrong_dtype",
    "wrong_input_name",
    "too_few_samples",
    "no_reference_onnx",
    "no_manifest",
    "malformed_manifest",
    "manifest_without_shards",
    "missing_shard",
    "two_captures",
    "factory_without_torch",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_error_line_and_repository_untouched(case, bad_runs, base):
    runs, before = bad_runs
    result, expect = runs[case]
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert lines[-1] == errors[0]
    assert expect in errors[0], errors[0]
    assert "expected" in errors[0]
    assert tree(base["repository"]) == before
    assert not list((base["root"] / "bad").rglob("small_onnx/2"))


def test_factory_of_another_architecture_is_refused(base):
    repository = fresh_repository(base, "other")
    before = tree(repository)
    result = run_cli(
        "export",
        "recalibrate",
        "--source",
        str(repository / "small" / "1"),
        "--calibration",
        str(base["capture"]),
        "--factory",
        "factories:build_other",
    )
    assert result.returncode == 1, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ")
    assert "has BatchNorm layers ['1']" in error
    assert "expected the source version's ['input_bn', 'bn1'" in error
    assert tree(repository) == before


def test_large_models_keep_per_channel_statistics_in_a_sidecar(base, monkeypatch):
    """Above INLINE_CHANNELS the per-channel arrays leave model.json for recalibration.json."""
    # export.recalibrate is also the function's name in the package: take the module itself.
    module = importlib.import_module("export.recalibrate")

    monkeypatch.setattr(module, "INLINE_CHANNELS", 10)
    repository = fresh_repository(base, "sidecar")
    report = module.recalibrate(repository / "small_onnx" / "1", base["capture"])
    version = Path(report.path)
    card = json.loads((version / "model.json").read_text())
    record = card["recalibration"]
    assert record["statistics_file"] == "recalibration.json"
    assert all(layer["before"] is None and layer["after"] is None for layer in record["layers"])
    sidecar = (version / "recalibration.json").read_bytes()
    assert card["files"]["recalibration.json"]["bytes"] == len(sidecar)
    assert card["files"]["recalibration.json"]["sha256"] == hashlib.sha256(sidecar).hexdigest()
    layers = {layer["name"]: layer for layer in json.loads(sidecar)}
    mean, var = bn_statistics(version)["bn2"]
    np.testing.assert_allclose(layers["bn2"]["after"]["mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(layers["bn2"]["after"]["var"], var, rtol=1e-6)
