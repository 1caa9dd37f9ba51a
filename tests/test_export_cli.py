"""`python -m export` as a user runs it: pytorch (factory + weights, or .pt2), onnx, demo.

Each subprocess costs seconds (torch import), so the error cases run concurrently once per module
and each case is checked by its own test. Outputs are checked against PyTorch or ONNX Runtime run
here, not against the figures the exporter prints.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import run_cli
from factories import INPUT_SHAPE, SmallNet, trained_weights
from onnx import helper
from onnx_builders import bn_node, bn_params, const, model, rand
from onnx_builders import run as run_reference

PARITY = 1e-4


def tree(path: Path) -> list[str]:
    """Every path under `path` with file sizes: what "untouched" compares."""
    if not path.exists():
        return []
    return sorted(
        f"{p.relative_to(path)}:{p.stat().st_size if p.is_file() else 'dir'}"
        for p in path.rglob("*")
    )


def rel_error(got: np.ndarray, expected: np.ndarray) -> float:
    assert got.shape == expected.shape
    scale = max(float(np.abs(expected).max()), 1e-12)
    return float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max()) / scale


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def assert_success(result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def small_net_checkpoint(directory: Path) -> Path:
    path = directory / "ckpt.pt"
    torch.save(trained_weights(), path)
    return path


def reference_small_net() -> SmallNet:
    model = SmallNet()
    model.load_state_dict(trained_weights())
    return model.eval()


def check_against_pytorch(version_dir: Path, model: torch.nn.Module) -> None:
    x = torch.randn(5, *INPUT_SHAPE, generator=torch.Generator().manual_seed(7)) * 2 + 1
    with torch.no_grad():
        expected = model(x).numpy()
    s = session(version_dir / "model.onnx")
    got = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
    assert rel_error(got, expected) <= PARITY
    folded = onnx.load(str(version_dir / "model.onnx"))
    assert "BatchNormalization" not in {n.op_type for n in folded.graph.node}


def bn_training_mode_onnx(path: Path) -> Path:
    m = model(
        [bn_node("bn", "x", "y", training_mode=1)],
        bn_params("bn", 3),
        {"x": [None, 3, 4, 4]},
        {"y": [None, 3, 4, 4]},
        opset=15,
    )
    onnx.save(m, str(path))
    return path


def conv_bn_onnx(path: Path) -> onnx.ModelProto:
    inits = [const("w", rand(6, 3, 3, 3)), *bn_params("bn1", 6), *bn_params("bn2", 6)]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("bn1", "c", "b"),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        bn_node("bn2", "r", "y"),
    ]
    m = model(nodes, inits, {"x": [None, 3, 8, 8]}, {"y": None})
    onnx.save(m, str(path))
    return m


# -- success paths ----------------------------------------------------------------------------


def test_pytorch_factory_and_weights(tmp_path):
    checkpoint = small_net_checkpoint(tmp_path)
    repository = tmp_path / "repo"
    result = run_cli(
        "export",
        "pytorch",
        "--factory",
        "factories:build_x",
        "--weights",
        str(checkpoint),
        "--input-shape",
        "3,16,16",
        "--name",
        "n",
        "--repository",
        str(repository),
    )
    assert_success(result)
    version = repository / "n" / "1"
    assert sorted(p.name for p in version.iterdir()) == [
        "model.json",
        "model.onnx",
        "reference.onnx",
    ]
    check_against_pytorch(version, reference_small_net())
    card = json.loads((version / "model.json").read_text())
    names = [layer["name"] for layer in card["batch_norm"]]
    assert names == ["input_bn", "bn1", "bn2", "post_bn", "head_bn"]
    assert all(layer["num_batches_tracked"] == 123 for layer in card["batch_norm"])
    # The summary table names every layer and the verification.
    for name in names:
        assert name in result.stdout
    assert "verification" in result.stdout
    assert "written to" in result.stdout


def test_pytorch_torch_export_pt2(tmp_path):
    model = reference_small_net()
    program = torch.export.export(
        model,
        (torch.randn(2, *INPUT_SHAPE),),
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
    )
    pt2 = tmp_path / "model.pt2"
    torch.export.save(program, pt2)
    repository = tmp_path / "repo"
    result = run_cli(
        "export",
        "pytorch",
        "--weights",
        str(pt2),
        "--input-shape",
        "3,16,16",
        "--name",
        "p",
        "--repository",
        str(repository),
    )
    assert_success(result)
    check_against_pytorch(repository / "p" / "1", model)


def test_onnx_file(tmp_path):
    source = conv_bn_onnx(tmp_path / "source.onnx")
    repository = tmp_path / "repo"
    result = run_cli(
        "export",
        "onnx",
        str(tmp_path / "source.onnx"),
        "--name",
        "o",
        "--repository",
        str(repository),
    )
    assert_success(result)
    x = rand(3, 3, 8, 8) * 3
    expected = run_reference(source, {"x": x})[0]
    s = session(repository / "o" / "1" / "model.onnx")
    assert rel_error(s.run(None, {"x": x})[0], expected) <= PARITY
    assert "bn1" in result.stdout
    assert "bn2" in result.stdout


# -- errors: one line, non-zero exit, repository untouched ------------------------------------


def _error_cases(base: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (CLI arguments after `export`, text the error line must contain)."""
    garbage = base / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 64)
    whole = base / "whole.pt"
    torch.save(SmallNet(), whole)  # pickles the module object: not weights-only
    checkpoint = small_net_checkpoint(base)
    unsupported = bn_training_mode_onnx(base / "training_mode.onnx")

    def pytorch(*extra: str, factory: str = "factories:build_x", shape: str = "3,16,16"):
        return ["pytorch", "--factory", factory, "--input-shape", shape, *extra]

    return {
        "unreadable_checkpoint": (pytorch("--weights", str(garbage)), "garbage.pt"),
        "not_weights_only": (pytorch("--weights", str(whole)), "weights-only"),
        "factory_not_a_module": (
            pytorch("--weights", str(checkpoint), factory="factories:not_a_module"),
            "torch.nn.Module",
        ),
        "factory_not_importable": (
            pytorch("--weights", str(checkpoint), factory="no_such_package.models:build"),
            "cannot import",
        ),
        "wrong_input_shape": (pytorch("--weights", str(checkpoint), shape="5,16,16"), "shape"),
        "weights_do_not_fit": (
            pytorch("--weights", str(checkpoint), factory="factories:build_other"),
            "do not fit",
        ),
        "unsupported_graph": (["onnx", str(unsupported)], "training_mode=1"),
        "bad_parity_tolerance": (
            pytorch("--weights", str(checkpoint), "--parity-tolerance", "-1"),
            "parity_tolerance=-1.0",
        ),
    }


ERROR_CASES = [
    "unreadable_checkpoint",
    "not_weights_only",
    "factory_not_a_module",
    "factory_not_importable",
    "wrong_input_shape",
    "weights_do_not_fit",
    "unsupported_graph",
    "bad_parity_tolerance",
]


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory):
    """Every error case run once, concurrently: name -> (result, repository, before, expect)."""
    base = tmp_path_factory.mktemp("cli_errors")
    cases = _error_cases(base)
    prepared = {}
    for name, (args, expect) in cases.items():
        repository = base / f"repo_{name}"
        (repository / "existing" / "1").mkdir(parents=True)
        (repository / "existing" / "1" / "model.json").write_text("{}")
        prepared[name] = (args, expect, repository, tree(repository))

    def run_one(name: str):
        args, _, repository, _ = prepared[name]
        return run_cli("export", *args, "--name", "n", "--repository", str(repository))

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(prepared, pool.map(run_one, prepared), strict=True))
    return {
        name: (results[name], repository, before, expect)
        for name, (_, expect, repository, before) in prepared.items()
    }


@pytest.mark.parametrize("case", ERROR_CASES)
def test_error_is_one_line_and_nothing_is_written(case, error_runs):
    result, repository, before, expect = error_runs[case]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert lines[-1] == errors[0], "the error line must be the last thing printed"
    assert expect in errors[0]
    assert "expected" in errors[0] or case == "factory_not_importable"
    assert tree(repository) == before
    assert not (repository / "n").exists()


def test_unreadable_checkpoint_is_not_called_a_pickled_object(error_runs):
    """Garbage bytes are not 'a checkpoint that pickles Python objects': the message must not
    send the user to re-save a state_dict when the file is not a checkpoint at all."""
    garbage = error_runs["unreadable_checkpoint"][0].stderr
    whole = error_runs["not_weights_only"][0].stderr
    garbage_line = next(line for line in garbage.splitlines() if line.startswith("error:"))
    whole_line = next(line for line in whole.splitlines() if line.startswith("error:"))
    assert "pickles Python objects" in whole_line
    assert "pickles Python objects" not in garbage_line


# -- the demo ---------------------------------------------------------------------------------


def test_demo_repository(demo_repository):
    version = demo_repository / "digits" / "1"
    assert version.is_dir()
    card = json.loads((version / "model.json").read_text())
    assert card["name"] == "digits"
    assert card["version"] == 1
    assert card["outputs"][0]["labels"] == [str(d) for d in range(10)]
    accuracy = float(re.search(r"accuracy\s+([0-9.]+)", card["description"]).group(1))
    assert accuracy >= 0.95
    layers = {layer["name"]: layer for layer in card["batch_norm"]}
    assert "input_bn" in layers
    assert layers["input_bn"]["channels"] == 1
    assert "head_bn" in layers
    assert layers["head_bn"]["channels"] == 64
    assert layers["input_bn"]["removed_by"] in {"rewritten_as_affine", "folded_forward_into_conv"}
    assert layers["head_bn"]["removed_by"] in {"folded_into_gemm", "folded_into_matmul"}
    samples = sorted((version / "samples").glob("*.json"))
    assert samples
    assert sorted(f"samples/{p.name}" for p in samples) == sorted(card["samples"])
    input_spec = card["inputs"][0]

    # The stated accuracy, checked here on the held-out digits with the folded graph.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    _, x_test, _, y_test = train_test_split(
        digits.images.astype(np.float32)[:, None],
        digits.target,
        test_size=0.25,
        random_state=0,
        stratify=digits.target,
    )
    s = session(version / "model.onnx")
    logits = s.run(None, {input_spec["name"]: x_test})[0]
    assert float((logits.argmax(1) == y_test).mean()) >= 0.95

    for path in samples:
        body = json.loads(path.read_text())
        (tensor,) = body["inputs"]
        assert tensor["name"] == input_spec["name"]
        assert tensor["datatype"] == "FP32"
        assert tensor["shape"][1:] == [1, 8, 8]
        assert len(tensor["data"]) == int(np.prod(tensor["shape"]))
