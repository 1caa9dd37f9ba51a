"""export.fold_onnx on ONNX models from any producer: graphs built with onnx.helper, a model
with external data, fixed batch 1, initializers listed as inputs, training-mode BN, and a
torch.onnx export already optimized by torch.

The oracle is ONNX Runtime running the source graph as written (graph optimizations off, so its
own BatchNormalization kernel runs), on fresh inputs of another batch size than the exporter's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import bn_node, bn_params, const, model, rand
from onnx_builders import run as run_source
from torch import nn

import export

PARITY = 1e-4
INDEPENDENCE = 1e-5


def rel_error(got: np.ndarray, expected: np.ndarray) -> float:
    assert got.shape == expected.shape, (got.shape, expected.shape)
    scale = max(float(np.abs(expected.astype(np.float64)).max()), 1e-12)
    return float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max()) / scale


def run_folded(version: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    s = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def op_types(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def tree(path: Path) -> list[str]:
    if not path.exists():
        return []
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def network() -> onnx.ModelProto:
    """Conv+BN, BN after Relu before an unpadded conv, GlobalAveragePool, Gemm+BN."""
    inits = [
        const("w1", rand(6, 3, 3, 3)),
        *bn_params("bn1", 6),
        *bn_params("bn2", 6),
        const("w2", rand(8, 6, 3, 3)),
        const("b2", rand(8)),
        *bn_params("bn3", 8),
        const("wg", rand(5, 8)),
        const("cg", rand(5)),
        *bn_params("bn4", 5),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        bn_node("bn1", "c1", "n1", epsilon=1e-3),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        bn_node("bn2", "r1", "n2"),
        helper.make_node("Conv", ["n2", "w2", "b2"], ["c2"], name="conv2", strides=[2, 2]),
        bn_node("bn3", "c2", "n3"),
        helper.make_node("GlobalAveragePool", ["n3"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg", "cg"], ["g"], name="fc", transB=1),
        bn_node("bn4", "g", "y", epsilon=0.01),
    ]
    return model(nodes, inits, {"x": [None, 3, 9, 9]}, {"y": None})


def test_helper_built_graph(tmp_path):
    source = network()
    snapshot = source.SerializeToString()
    report = export.fold_onnx(source, repository=tmp_path, name="net")
    assert source.SerializeToString() == snapshot  # the caller's ModelProto is not changed
    version = tmp_path / "net" / "1"
    assert Path(report.path) == version

    x = rand(3, 3, 9, 9) * 2
    expected = run_source(source, {"x": x})[0]
    got = run_folded(version, {"x": x})[0]
    assert rel_error(got, expected) <= PARITY
    for i in range(3):
        alone = run_folded(version, {"x": x[i : i + 1]})[0]
        assert rel_error(alone, got[i : i + 1]) <= INDEPENDENCE
    assert "BatchNormalization" not in op_types(version / "model.onnx")
    assert op_types(version / "reference.onnx").count("BatchNormalization") == 4

    card = json.loads((version / "model.json").read_text())
    assert card["source"] == "onnx"
    assert card["verification"]["oracle"] == "reference.onnx"
    layers = {layer["name"]: layer for layer in card["batch_norm"]}
    assert {name: layer["removed_by"] for name, layer in layers.items()} == {
        "bn1": "folded_into_conv",
        "bn2": "folded_forward_into_conv",
        "bn3": "folded_into_conv",
        "bn4": "folded_into_gemm",
    }
    assert layers["bn1"]["eps"] == pytest.approx(1e-3)
    assert layers["bn4"]["eps"] == pytest.approx(0.01)
    assert layers["bn2"]["eps"] == pytest.approx(1e-5)
    assert all(
        layer["channels"] == c for layer, c in zip(card["batch_norm"], [6, 6, 8, 5], strict=True)
    )
    assert all(layer["num_batches_tracked"] is None for layer in card["batch_norm"])
    assert card["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, 3, 9, 9], "labels": None}
    ]


def test_model_with_external_data(tmp_path):
    source = network()
    source_dir = tmp_path / "source"
    source_dir.mkdir()
    path = source_dir / "net.onnx"
    onnx.save_model(
        source,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="net.weights",
        size_threshold=0,
    )
    stored = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in stored.graph.initializer)

    repository = tmp_path / "repo"
    report = export.fold_onnx(path, repository=repository, name="ext")
    version = Path(report.path)
    assert sorted(p.name for p in version.iterdir()) == [
        "model.json",
        "model.onnx",
        "reference.onnx",
    ]
    for filename in ("model.onnx", "reference.onnx"):
        graph = onnx.load(str(version / filename), load_external_data=False).graph
        for tensor in graph.initializer:
            assert tensor.data_location != TensorProto.EXTERNAL
            assert not tensor.external_data

    x = rand(2, 3, 9, 9)
    expected = run_source(onnx.load(str(path)), {"x": x})[0]
    assert rel_error(run_folded(version, {"x": x})[0], expected) <= PARITY


def test_fixed_batch_one_becomes_dynamic(tmp_path):
    inits = [const("w", rand(4, 3, 3, 3)), *bn_params("bn", 4), *bn_params("post", 4)]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("bn", "c", "n"),
        helper.make_node("Sigmoid", ["n"], ["s"], name="act"),
        bn_node("post", "s", "y"),
    ]
    source = model(nodes, inits, {"x": [1, 3, 6, 6]}, {"y": [1, 4, 6, 6]})
    report = export.fold_onnx(source, repository=tmp_path, name="fixed")
    assert report.inputs[0].shape == [-1, 3, 6, 6]
    assert report.outputs[0].shape == [-1, 4, 6, 6]
    folded = onnx.load(str(Path(report.path) / "model.onnx"))
    for value in [*folded.graph.input, *folded.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param

    x = rand(5, 3, 6, 6)
    got = run_folded(Path(report.path), {"x": x})[0]
    for i in range(5):  # the source only takes batch 1
        expected = run_source(source, {"x": x[i : i + 1]})[0]
        assert rel_error(got[i : i + 1], expected) <= PARITY


def test_old_style_model_with_initializers_as_inputs(tmp_path):
    """IR 3 lists every initializer as a graph input too; serving fixes the weights."""
    weights = [const("w", rand(4, 3, 3, 3)), const("b", rand(4)), *bn_params("bn", 4)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 6, 6])] + [
        helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in weights
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("bn", "c", "y"),
    ]
    graph = helper.make_graph(
        nodes,
        "old",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 6, 6])],
        initializer=weights,
    )
    source = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    source.ir_version = 3
    onnx.checker.check_model(source)

    report = export.fold_onnx(source, repository=tmp_path, name="old")
    assert [i.name for i in report.inputs] == ["x"]
    assert report.batch_norm[0].removed_by == "folded_into_conv"
    folded = onnx.load(str(Path(report.path) / "model.onnx"))
    assert [i.name for i in folded.graph.input] == ["x"]
    x = rand(3, 3, 6, 6)
    expected = run_source(source, {"x": x})[0]
    assert rel_error(run_folded(Path(report.path), {"x": x})[0], expected) <= PARITY


def test_training_mode_batch_norm_is_refused_and_nothing_is_written(tmp_path):
    inits = [const("w", rand(3, 3, 1, 1)), *bn_params("bn", 3)]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        bn_node("bn", "c", "y", training_mode=1),
    ]
    source = model(nodes, inits, {"x": [None, 3, 4, 4]}, {"y": [None, 3, 4, 4]}, opset=15)
    repository = tmp_path / "repo"
    with pytest.raises(export.BatchStatisticsError, match="training_mode=1") as info:
        export.fold_onnx(source, repository=repository, name="train")
    assert info.value.layers == ["bn"]
    assert "\n" not in str(info.value)
    assert not repository.exists()


class TorchNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.bn_after_relu = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        self.bn3 = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn_after_relu(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.fc(x.mean(dim=(2, 3))))


def test_torch_onnx_export_with_optimize_true(tmp_path):
    """torch's optimizer already folded the easy Conv+BN pairs; the rest must still go."""
    torch.manual_seed(0)
    net = TorchNet()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1, generator=gen)
                m.running_var.uniform_(0.2, 2, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-1, 1, generator=gen)
    net.eval()
    path = tmp_path / "torch.onnx"
    torch.onnx.export(
        net,
        (torch.randn(2, 3, 8, 8),),
        str(path),
        dynamo=True,
        optimize=True,
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        input_names=["x"],
    )
    source = onnx.load(str(path))
    report = export.fold_onnx(path, repository=tmp_path / "repo", name="torch")
    version = Path(report.path)
    assert "BatchNormalization" not in op_types(version / "model.onnx")

    x = torch.randn(5, 3, 8, 8, generator=gen)
    got = run_folded(version, {"x": x.numpy()})[0]
    assert rel_error(got, run_source(source, {"x": x.numpy()})[0]) <= PARITY
    with torch.no_grad():
        assert rel_error(got, net(x).numpy()) <= PARITY


@pytest.mark.parametrize(
    ("dtype", "tolerance", "datatype"),
    [(np.float16, 1e-2, "FP16"), (np.float64, 1e-8, "FP64")],
    ids=["float16", "float64"],
)
def test_folded_weights_keep_the_graph_dtype(tmp_path, dtype, tolerance, datatype):
    """Rule 7: fold in float64, cast back to the graph's dtype (Gemm: ORT's CPU kernels take
    both dtypes)."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    params = [numpy_helper.to_array(t) for t in bn_params("bn", 4)]
    names = ["bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"]
    inits = [const("w", rand(6, 4).astype(dtype)), const("c", rand(4).astype(dtype))] + [
        const(n, p.astype(dtype)) for n, p in zip(names, params, strict=True)
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w", "c"], ["g"], name="fc"),
        bn_node("bn", "g", "y"),
    ]
    graph = helper.make_graph(
        nodes,
        "typed",
        [helper.make_tensor_value_info("x", elem, [None, 6])],
        [helper.make_tensor_value_info("y", elem, [None, 4])],
        initializer=inits,
    )
    source = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    source.ir_version = 8
    report = export.fold_onnx(source, repository=tmp_path, name="typed")
    assert report.inputs[0].datatype == datatype
    assert report.batch_norm[0].removed_by == "folded_into_gemm"
    folded = onnx.load(str(Path(report.path) / "model.onnx"))
    assert {t.data_type for t in folded.graph.initializer} == {elem}
    x = rand(3, 6).astype(dtype)
    got = run_folded(Path(report.path), {"x": x})[0]
    assert got.dtype == dtype
    assert rel_error(got, run_source(source, {"x": x})[0]) <= tolerance


def test_a_graph_that_hard_codes_batch_one_is_an_export_error(tmp_path):
    """Reshape to (1, -1) cannot take another batch: refused, not published."""
    inits = [
        const("w", rand(4, 3, 3, 3)),
        *bn_params("bn", 4),
        const("shape", np.array([1, -1], dtype=np.int64)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        bn_node("bn", "c", "b"),
        helper.make_node("Reshape", ["b", "shape"], ["y"], name="flatten"),
    ]
    source = model(nodes, inits, {"x": [1, 3, 6, 6]}, {"y": None})
    repository = tmp_path / "repo"
    with pytest.raises(export.ExportError):
        export.fold_onnx(source, repository=repository, name="pinned")
    assert not repository.exists()


@pytest.mark.parametrize("content", [None, b"not an onnx model at all"], ids=["missing", "garbage"])
def test_unreadable_source_is_invalid_input(tmp_path, content):
    path = tmp_path / "source.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(export.InvalidInputError) as info:
        export.fold_onnx(path, repository=tmp_path / "repo", name="bad")
    assert "\n" not in str(info.value)
    assert tree(tmp_path / "repo") == []
