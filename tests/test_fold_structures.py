"""Fold rules past the common anchors, against PyTorch float64 on hand-built modules exported by
torch.onnx: weight standardization (constant subgraphs, rule 0), BN after a Concat of convs
(rule 9, MixNet), BN on a RepVGG identity branch (rule 10), and the rule table itself."""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import helper
from onnx_builders import bn_node, bn_params, const, model, op_types, rand, run
from torch import nn

import export
from export.card import BatchNormLayer
from export.errors import BatchStatisticsError
from export.fold import REMOVED_BY, RULES, fold_batch_norms
from export.torch_onnx import to_onnx

ROOT = Path(__file__).resolve().parents[1]


def realistic(module: nn.Module, *shape: int, seed: int = 0) -> nn.Module:
    """Random weights, BN statistics from train-mode passes, then eval."""
    torch.manual_seed(seed)
    for p in module.parameters():
        with torch.no_grad():
            p.uniform_(-0.5, 0.5)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            m.momentum = None
    module.train()
    with torch.no_grad():
        for _ in range(3):
            module(torch.randn(8, *shape) * 2 + 0.5)
    return module.eval()


def exported_and_folded(module: nn.Module, *shape: int):
    example = torch.randn(2, *shape)
    reference = to_onnx(module, (example,), ["x"], ["y"])
    result = fold_batch_norms(reference)
    onnx.checker.check_model(result.model, full_check=True)
    assert "BatchNormalization" not in op_types(result.model)
    return reference, result


def assert_matches_float64(module: nn.Module, folded: onnx.ModelProto, *shape: int) -> None:
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(7)) * 2 + 0.5
    with torch.no_grad():
        expected = module.double()(x.double()).numpy()
    module.float()
    session = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy()})[0]
    scale = float(np.abs(expected).max())
    assert float(np.abs(got - expected).max()) / scale <= 1e-5


# -- the table ---------------------------------------------------------------------------------


def test_every_removed_by_value_is_in_the_card_enum_and_models_readme():
    enum = set(BatchNormLayer.model_json_schema()["properties"]["removed_by"]["enum"])
    assert set(REMOVED_BY) <= enum
    assert enum - set(REMOVED_BY) == {"per_sample_normalization"}
    readme = (ROOT / "models" / "README.md").read_text()
    section = readme[readme.index("`removed_by` is one of") :].split("\n\n")[0]
    assert set(re.findall(r"`([a-z_]+)`", section)) - {"removed_by", "track_running_stats"} == enum


def test_rule_table_orders_producer_rules_first_and_names_unique_per_side():
    sides = [rule.side.value for rule in RULES]
    assert sides == sorted(sides)  # "producer" < "reader": producers are always tried first
    keys = [(rule.op_type, rule.side) for rule in RULES]
    assert len(keys) == len(set(keys))


# -- rule 0: weight standardization ------------------------------------------------------------


class StdConv2d(nn.Conv2d):
    """timm's StdConv2d: the weight standardized with F.batch_norm(training=True)."""

    def forward(self, x):
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None,
            training=True, momentum=0.0, eps=1e-6,
        ).reshape_as(self.weight)  # fmt: skip
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """timm's ScaledStdConv2d: batch_norm over the weight with a learned gain as its scale."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), 1.3))
        self.scale = self.weight[0].numel() ** -0.5

    def forward(self, x):
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None,
            weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0, eps=1e-6,
        ).reshape_as(self.weight)  # fmt: skip
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


@pytest.mark.parametrize("conv", [StdConv2d, ScaledStdConv2d])
def test_weight_standardized_conv_is_constant_folded_and_its_bn_folds(conv):
    module = realistic(
        nn.Sequential(conv(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()), 3, 9, 9
    )
    reference, result = exported_and_folded(module, 3, 9, 9)
    assert "BatchNormalization" in op_types(reference)  # the standardization is in the export
    assert [layer.method for layer in result.layers] == ["folded_into_conv"]
    assert op_types(result.model) == ["Conv", "Relu"]
    standardized = [f for f in result.constant_folds if "BatchNormalization" in f.op_types]
    assert len(standardized) == 1
    assert "ReduceMean" in standardized[0].op_types
    assert_matches_float64(module, result.model, 3, 9, 9)


_LIBRARIES: list = []  # a torch.library.Library must stay alive for its definitions to hold


def timm_module(name: str):
    """A timm module, or a skip without timm. timm imports torchvision, which on a CPU torch
    built without torchvision's operators needs their schemas declared first."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (make zoo-deps)")
    if "torchvision" not in sys.modules:
        try:
            torch.ops.torchvision.nms  # noqa: B018
        except (AttributeError, RuntimeError):
            library = torch.library.Library("torchvision", "DEF")
            for op in ("nms", "qnms"):
                library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _LIBRARIES.append(library)
    return importlib.import_module(name)


def test_timm_std_conv_when_timm_is_installed():
    layers = timm_module("timm.layers")
    module = realistic(
        nn.Sequential(layers.StdConv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6),
                      layers.ScaledStdConv2d(6, 6, 3, padding=1)), 4, 7, 7
    )  # fmt: skip
    _, result = exported_and_folded(module, 4, 7, 7)
    assert op_types(result.model) == ["Conv", "Conv"]
    assert_matches_float64(module, result.model, 4, 7, 7)


def test_statistics_of_the_data_still_stop_the_fold_after_constant_folding():
    """A BN normalizing with statistics of its input is refused even when its parameters and
    part of its statistics' computation are constant subgraphs."""
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    reference = to_onnx(realistic(module, 3, 6, 6), (torch.randn(2, 3, 6, 6),), ["x"], ["y"])
    with pytest.raises(BatchStatisticsError, match="ReduceMean"):
        fold_batch_norms(reference)


def test_constant_subgraph_is_computed_in_float64_and_cast_once():
    """w * (1/3) * 3 through float32 Casts: float64 keeps w exactly, float32 would round."""
    w = rand(4, 2, 1, 1)
    third = np.array(1 / 3, np.float32)
    inits = [const("w", w), const("third", third), const("three", np.array(3, np.float32))]
    nodes = [
        helper.make_node("Mul", ["w", "third"], ["w3"]),
        helper.make_node("Cast", ["w3"], ["w3c"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", ["w3c", "three"], ["w1"]),
        helper.make_node("Conv", ["x", "w1"], ["y"], name="conv"),
    ]
    m = model(nodes, inits, {"x": [None, 2, 3, 3]}, {"y": None})
    result = fold_batch_norms(m)
    assert op_types(result.model) == ["Conv"]
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    weight = stored[result.model.graph.node[0].input[1]]
    expected = (w.astype(np.float64) * np.float64(third) * 3).astype(np.float32)
    assert weight.tobytes() == expected.tobytes()
    assert [f.nodes for f in result.constant_folds] == [3]


def test_large_expand_of_a_constant_is_not_materialized():
    inits = [const("one", np.ones((1,), np.float32)), const("shape", np.array([300, 300]))]
    nodes = [
        helper.make_node("Expand", ["one", "shape"], ["big"]),
        helper.make_node("Add", ["x", "big"], ["y"]),
    ]
    m = model(nodes, inits, {"x": [300, 300]}, {"y": None})
    assert op_types(fold_batch_norms(m).model) == ["Expand", "Add"]


# -- rule 9: BN after a Concat of convolutions -------------------------------------------------


class MixedConv(nn.Module):
    """timm's MixedConv2d: split the channels, one conv per kernel size, concat, then BN."""

    def __init__(self, splits=(3, 3, 2), kernels=(3, 5, 7), out=(4, 4, 6), depthwise=False):
        super().__init__()
        self.splits = list(splits)
        self.convs = nn.ModuleList(
            nn.Conv2d(c, c if depthwise else o, k, padding=k // 2, groups=c if depthwise else 1)
            for c, k, o in zip(splits, kernels, out, strict=True)
        )
        width = sum(splits) if depthwise else sum(out)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x):
        parts = torch.split(x, self.splits, dim=1)
        return torch.relu(
            self.bn(torch.cat([c(p) for c, p in zip(self.convs, parts, strict=True)], dim=1))
        )


@pytest.mark.parametrize("depthwise", [False, True])
def test_bn_after_concat_of_convs_folds_slice_by_slice(depthwise):
    module = realistic(MixedConv(depthwise=depthwise), 8, 10, 10)
    _, result = exported_and_folded(module, 8, 10, 10)
    assert [layer.method for layer in result.layers] == ["folded_into_concatenated_convs"]
    assert "Mul" not in op_types(result.model)
    assert_matches_float64(module, result.model, 8, 10, 10)


def test_timm_mixed_conv_when_timm_is_installed():
    layers = timm_module("timm.layers")
    conv = layers.MixedConv2d(12, 12, kernel_size=[3, 5, 7], padding="", depthwise=True)
    module = realistic(nn.Sequential(conv, nn.BatchNorm2d(12), nn.ReLU()), 12, 9, 9)
    _, result = exported_and_folded(module, 12, 9, 9)
    assert [layer.method for layer in result.layers] == ["folded_into_concatenated_convs"]
    assert_matches_float64(module, result.model, 12, 9, 9)


def concat_graph(axis: int, extra_reader: bool = False, relu_input: bool = False):
    inits = [const("w1", rand(3, 2, 3, 3)), const("w2", rand(5, 2, 1, 1)), *bn_params("bn", 8)]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "w2"], ["c2"], name="conv2"),
    ]
    second = "c2"
    if relu_input:
        nodes.append(helper.make_node("Relu", ["c2"], ["r2"], name="relu"))
        second = "r2"
    nodes += [
        helper.make_node("Concat", ["c1", second], ["cat"], name="cat", axis=axis),
        bn_node("bn", "cat", "y"),
    ]
    outputs = {"y": None, "c1": None} if extra_reader else {"y": None}
    return model(nodes, inits, {"x": [None, 2, 5, 5]}, outputs)


@pytest.mark.parametrize(
    ("axis", "extra_reader", "relu_input", "method"),
    [
        (1, False, False, "folded_into_concatenated_convs"),
        (-3, False, False, "folded_into_concatenated_convs"),
        (1, True, False, "rewritten_as_affine"),  # a conv output also read elsewhere
        (1, False, True, "rewritten_as_affine"),  # a Concat input that is not a conv
    ],
)
def test_concat_rule_refuses_unless_every_input_is_a_private_conv(
    axis, extra_reader, relu_input, method
):
    m = concat_graph(axis, extra_reader, relu_input)
    result = fold_batch_norms(m)
    assert [layer.method for layer in result.layers] == [method]
    feeds = {"x": rand(3, 2, 5, 5)}
    for e, g in zip(run(m, feeds), run(result.model, feeds), strict=True):
        assert float(np.abs(e - g).max()) <= 1e-5 * float(np.abs(e).max())


# -- rule 10: RepVGG identity branch ------------------------------------------------------------


class RepVggBlock(nn.Module):
    """RepVGG's training-time block: BN(x) + BN(conv3x3(x)) + BN(conv1x1(x)), then ReLU."""

    def __init__(self, cin, cout, *, stride=1, groups=1, identity=True, order="timm"):
        super().__init__()
        self.order = order
        self.identity = nn.BatchNorm2d(cin) if identity else None
        self.dense = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(cout)
        )
        self.one = nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, 0, groups=groups, bias=False), nn.BatchNorm2d(cout)
        )

    def forward(self, x):
        if self.order == "timm":  # timm: conv_1x1(x) + conv_kxk(x), then += identity
            identity = self.identity(x)
            y = self.one(x) + self.dense(x)
            y = y + identity
        else:  # the paper's code: rbr_dense(x) + rbr_1x1(x) + id_out, BN applied last
            y = self.identity(x) + (self.dense(x) + self.one(x))
        return torch.relu(y)


@pytest.mark.parametrize(("groups", "order"), [(1, "timm"), (2, "timm"), (4, "paper")])
def test_repvgg_block_becomes_one_conv(groups, order):
    module = realistic(nn.Sequential(RepVggBlock(8, 8, groups=groups, order=order)), 8, 7, 7)
    _, result = exported_and_folded(module, 8, 7, 7)
    methods = {layer.layer.rsplit(".", 1)[-1]: layer.method for layer in result.layers}
    assert methods["identity"] == "reparameterized_into_conv"
    assert op_types(result.model) == ["Conv", "Relu"]
    conv = result.model.graph.node[0]
    assert {a.name: helper.get_attribute_value(a) for a in conv.attribute}["group"] == groups
    assert_matches_float64(module, result.model, 8, 7, 7)


def test_timm_repvgg_block_when_timm_is_installed():
    byobnet = timm_module("timm.models.byobnet")
    block = byobnet.RepVggBlock(8, 8, group_size=4)
    module = realistic(nn.Sequential(block), 8, 6, 6)
    _, result = exported_and_folded(module, 8, 6, 6)
    assert "reparameterized_into_conv" in {layer.method for layer in result.layers}
    assert op_types(result.model).count("Conv") == 1
    assert_matches_float64(module, result.model, 8, 6, 6)


def test_repvgg_with_a_broadcast_identity_is_refused():
    """One input channel broadcast over eight outputs: no identity kernel exists."""
    block = RepVggBlock(1, 8, identity=False)
    block.identity = nn.BatchNorm2d(1)
    module = realistic(nn.Sequential(block), 1, 6, 6)
    _, result = exported_and_folded(module, 1, 6, 6)
    identity = next(layer for layer in result.layers if layer.layer.endswith("identity"))
    assert identity.method == "rewritten_as_affine"
    assert_matches_float64(module, result.model, 1, 6, 6)


def test_repvgg_with_stride_2_is_refused():
    """On a 1x1 map the stride-2 block keeps its shape, but the rule never assumes it."""
    module = realistic(nn.Sequential(RepVggBlock(4, 4, stride=2)), 4, 1, 1)
    _, result = exported_and_folded(module, 4, 1, 1)
    identity = next(layer for layer in result.layers if layer.layer.endswith("identity"))
    assert identity.method == "rewritten_as_affine"
    assert op_types(result.model).count("Conv") == 2
    assert_matches_float64(module, result.model, 4, 1, 1)


def repvgg_graph(conv3: dict, conv1: dict, w3_shape=(4, 4, 3, 3), w1_shape=(4, 4, 1, 1), **kw):
    inits = [const("w3", rand(*w3_shape)), const("w1", rand(*w1_shape)), *bn_params("bn", 4)]
    nodes = [
        helper.make_node("Conv", ["x", "w3"], ["c3"], name="c3", **conv3),
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="c1", **conv1),
        bn_node("bn", "x", "i"),
        helper.make_node("Add", ["c3", "c1"], ["s"], name="s"),
        helper.make_node("Add", ["i", "s"], ["y"], name="y"),
    ]
    outputs = {"y": None, "c1": None} if kw.get("c1_is_output") else {"y": None}
    return model(nodes, inits, {"x": [None, 4, 6, 6]}, outputs)


PAD1 = {"pads": [1, 1, 1, 1]}


@pytest.mark.parametrize(
    ("graph", "method"),
    [
        (repvgg_graph(PAD1, {}), "reparameterized_into_conv"),
        (repvgg_graph(PAD1, {}, c1_is_output=True), "rewritten_as_affine"),  # branch read twice
        (  # one group count for all branches, or the kernels cannot merge
            repvgg_graph({**PAD1, "group": 2}, {}, w3_shape=(4, 2, 3, 3)),
            "rewritten_as_affine",
        ),
        (  # dilation 2 with pads 2 keeps the shape, but its taps are not a 3x3 kernel's
            repvgg_graph({"pads": [2, 2, 2, 2], "dilations": [2, 2]}, {}),
            "rewritten_as_affine",
        ),
        (repvgg_graph({"pads": [1, 1, 1, 1]}, {"pads": [0, 0, 0, 0], "strides": [1, 1]}), None),
    ],
)
def test_repvgg_rule_on_onnx_graphs(graph, method):
    result = fold_batch_norms(graph)
    assert result.layers[0].method == (method or "reparameterized_into_conv")
    if result.layers[0].method == "reparameterized_into_conv":
        assert op_types(result.model) == ["Conv"]
    feeds = {"x": rand(2, 4, 6, 6)}
    for e, g in zip(run(graph, feeds), run(result.model, feeds), strict=True):
        assert float(np.abs(e - g).max()) <= 1e-5 * float(np.abs(e).max())


# -- rule 11: a served graph as lean as torch's optimize=True ----------------------------------


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleBlock(nn.Module):
    """torchvision's ShuffleNetV2 unit (stride 1): chunk, a branch, concat, channel shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
            nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
        )  # fmt: skip

    def forward(self, x):
        left, right = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((left, self.branch(right)), dim=1), 2)


def torch_optimized_node_count(module: nn.Module, example: torch.Tensor) -> int:
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        module, (example,), dynamo=True, optimize=True, dynamic_shapes=({0: batch},)
    )
    return len(program.model_proto.graph.node)


def test_served_graph_is_as_lean_as_torch_optimize_and_records_name_its_nodes():
    module = realistic(nn.Sequential(ShuffleBlock(8), ShuffleBlock(8), nn.Flatten()), 8, 5, 5)
    reference, result = exported_and_folded(module, 8, 5, 5)
    anchor = torch_optimized_node_count(module, torch.randn(2, 8, 5, 5))
    assert len(result.model.graph.node) <= anchor < len(reference.graph.node)
    assert not {"Identity", "Constant", "SequenceAt"} & set(op_types(result.model))
    names = {n.name for n in result.model.graph.node}
    assert {layer.target for layer in result.layers} <= names
    assert_matches_float64(module, result.model, 8, 5, 5)


def test_lean_rewrites_change_no_output_bit(monkeypatch):
    module = realistic(nn.Sequential(ShuffleBlock(8), RepVggBlock(8, 8)), 8, 5, 5)
    reference = to_onnx(module, (torch.randn(2, 8, 5, 5),), ["x"], ["y"])
    lean = fold_batch_norms(reference).model
    monkeypatch.setattr(export.fold, "make_lean", lambda m: m)
    unsimplified = fold_batch_norms(reference).model
    assert len(lean.graph.node) < len(unsimplified.graph.node)
    feeds = {"x": rand(3, 8, 5, 5)}
    for before, after in zip(run(unsimplified, feeds), run(lean, feeds), strict=True):
        assert before.tobytes() == after.tobytes()


def test_exported_card_records_the_constant_folds_and_the_rules(tmp_path):
    """End to end: a weight-standardized conv, a MixNet conv and a RepVGG block in one model;
    the card names each rule and the standardized weight, and the export's own checks pass."""
    module = realistic(
        nn.Sequential(StdConv2d(3, 8, 3, padding=1), MixedConv(splits=(4, 4), kernels=(3, 5),
                      out=(4, 4)), RepVggBlock(8, 8)), 3, 8, 8
    )  # fmt: skip
    report = export.export_model(module, torch.randn(2, 3, 8, 8), repository=tmp_path, name="m")
    methods = {layer.name: layer.removed_by for layer in report.batch_norm}
    assert methods["1.bn"] == "folded_into_concatenated_convs"
    assert methods["2.identity"] == "reparameterized_into_conv"
    card = json.loads((Path(report.path) / "model.json").read_text())
    (standardized,) = [c for c in card["constant_folds"] if "BatchNormalization" in c["op_types"]]
    assert standardized["read_by"]
    assert report.verification.batch_norm_nodes_left == 0
    folded = onnx.load(Path(report.path) / "model.onnx")
    assert op_types(folded).count("Conv") == 4  # std conv, two mixed convs, one RepVGG conv
    assert {layer.folded_into for layer in report.batch_norm} <= {n.name for n in folded.graph.node}
