"""Each fold rule on graphs built with onnx.helper (any producer), against ONNX Runtime running
the unfolded graph with its own BatchNormalization kernel and no graph optimizations."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx_builders import bn_node, bn_params, const, model, op_types, rand, run

from export.errors import BatchStatisticsError, UnsupportedGraphError
from export.fold import fold_batch_norms


def assert_same(reference: onnx.ModelProto, folded: onnx.ModelProto, feeds, rtol=1e-5) -> None:
    expected, got = run(reference, feeds), run(folded, feeds)
    assert len(expected) == len(got)
    for e, g in zip(expected, got, strict=True):
        assert e.shape == g.shape
        scale = max(float(np.abs(e).max()), 1e-6)
        assert float(np.abs(e - g).max()) / scale <= rtol


def fold(m: onnx.ModelProto):
    result = fold_batch_norms(m)
    onnx.checker.check_model(result.model, full_check=True)
    assert "BatchNormalization" not in op_types(result.model)
    return result


# -- rule 1: Conv ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dims", "stride", "dilation", "groups", "bias"),
    [
        (1, 1, 1, 1, True),
        (1, 2, 2, 2, False),
        (2, 1, 1, 1, False),
        (2, 2, 1, 1, True),
        (2, 1, 2, 4, True),
        (2, 1, 1, 8, False),  # depthwise: groups == in channels == out channels
        (3, 1, 1, 1, True),
        (3, 2, 1, 2, False),
    ],
)
def test_conv_then_bn_folds_into_conv(dims, stride, dilation, groups, bias):
    cin, cout, k = 8, 8, 3
    spatial = [9] * dims
    weight = rand(cout, cin // groups, *[k] * dims)
    inits = [const("w", weight), *bn_params("bn", cout)]
    conv_inputs = ["x", "w"]
    if bias:
        inits.append(const("b", rand(cout)))
        conv_inputs.append("b")
    nodes = [
        helper.make_node(
            "Conv",
            conv_inputs,
            ["c"],
            name="conv",
            strides=[stride] * dims,
            dilations=[dilation] * dims,
            pads=[1] * 2 * dims,
            group=groups,
        ),
        bn_node("bn", "c", "y", epsilon=1e-3),
    ]
    m = model(nodes, inits, {"x": [None, cin, *spatial]}, {"y": None})
    result = fold(m)
    assert [layer.method for layer in result.layers] == ["folded_into_conv"]
    assert op_types(result.model) == ["Conv"]
    assert_same(m, result.model, {"x": rand(3, cin, *spatial)})


def test_fold_math_is_float64_with_eps_from_the_node():
    """Rule 7: the folded weight is exactly the float64 product cast once to float32."""
    weight = rand(4, 2, 3, 3)
    inits = [const("w", weight), *bn_params("bn", 4)]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        bn_node("bn", "c", "y", epsilon=0.25),
    ]
    m = model(nodes, inits, {"x": [None, 2, 5, 5]}, {"y": None})
    folded = fold(m).model
    gamma, beta, mean, var = (numpy_helper.to_array(t).astype(np.float64) for t in inits[1:])
    a = gamma / np.sqrt(var + 0.25)
    expected_w = (weight.astype(np.float64) * a[:, None, None, None]).astype(np.float32)
    expected_b = (beta - mean * a).astype(np.float32)
    conv = folded.graph.node[0]
    values = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    assert values[conv.input[1]].tobytes() == expected_w.tobytes()
    assert values[conv.input[2]].tobytes() == expected_b.tobytes()


def test_default_epsilon_is_1e_5():
    inits = bn_params("bn", 3)
    m = model([bn_node("bn", "x", "y")], inits, {"x": [None, 3, 4]}, {"y": None})
    result = fold(m)
    assert result.layers[0].epsilon == pytest.approx(1e-5)
    assert_same(m, result.model, {"x": rand(2, 3, 4)})


# -- rule 2: ConvTranspose -------------------------------------------------------------------


@pytest.mark.parametrize(("groups", "bias"), [(1, True), (2, False), (4, True)])
def test_conv_transpose_then_bn_scales_axis_1_per_group(groups, bias):
    cin, cout = 8, 12
    weight = rand(cin, cout // groups, 3, 3)  # (Cin, Cout/groups, k, k)
    inits = [const("w", weight), *bn_params("bn", cout)]
    inputs = ["x", "w"]
    if bias:
        inits.append(const("b", rand(cout)))
        inputs.append("b")
    nodes = [
        helper.make_node(
            "ConvTranspose", inputs, ["c"], name="deconv", strides=[2, 2], group=groups
        ),
        bn_node("bn", "c", "y"),
    ]
    m = model(nodes, inits, {"x": [None, cin, 5, 5]}, {"y": None})
    result = fold(m)
    assert result.layers[0].method == "folded_into_conv_transpose"
    assert_same(m, result.model, {"x": rand(2, cin, 5, 5)})


# -- rule 3: Gemm and MatMul -----------------------------------------------------------------


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (6,), (1, 6), ()])
def test_gemm_then_bn1d_folds(trans_b, c_shape):
    weight = rand(6, 5) if trans_b else rand(5, 6)
    inits = [const("w", weight), *bn_params("bn", 6)]
    inputs = ["x", "w"]
    if c_shape is not None:
        inits.append(const("c", rand(*c_shape)))
        inputs.append("c")
    nodes = [
        helper.make_node("Gemm", inputs, ["g"], name="fc", transB=trans_b, alpha=0.5, beta=2.0),
        bn_node("bn", "g", "y"),
    ]
    m = model(nodes, inits, {"x": [None, 5]}, {"y": None})
    result = fold(m)
    assert result.layers[0].method == "folded_into_gemm"
    assert op_types(result.model) == ["Gemm"]
    assert_same(m, result.model, {"x": rand(7, 5)})


@pytest.mark.parametrize("with_add", [True, False])
def test_matmul_then_bn1d_folds(with_add):
    inits = [const("w", rand(5, 6)), *bn_params("bn", 6)]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm")]
    last = "mm"
    if with_add:
        inits.append(const("bias", rand(6)))
        nodes.append(helper.make_node("Add", ["mm", "bias"], ["lin"], name="add"))
        last = "lin"
    nodes.append(bn_node("bn", last, "y"))
    m = model(nodes, inits, {"x": [None, 5]}, {"y": None})
    result = fold(m)
    assert result.layers[0].method == "folded_into_matmul"
    assert op_types(result.model) == ["MatMul", "Add"]
    assert_same(m, result.model, {"x": rand(4, 5)})


def test_linear_on_ncl_then_bn1d_is_not_misfolded_when_l_equals_c():
    """Linear acts on L (axis 2), BN on C (axis 1): scaling the weight's columns would be
    wrong, and shapes cannot tell when L == C."""
    c = length = 6
    inits = [const("w", rand(length, length)), const("bias", rand(length)), *bn_params("bn", c)]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
        helper.make_node("Add", ["mm", "bias"], ["lin"], name="add"),
        bn_node("bn", "lin", "y"),
    ]
    m = model(nodes, inits, {"x": [None, c, length]}, {"y": None})
    result = fold(m)
    assert result.layers[0].method == "rewritten_as_affine"
    assert_same(m, result.model, {"x": rand(3, c, length)})


# -- rule 4: no foldable producer ------------------------------------------------------------


def test_bn_on_graph_input_is_an_affine():
    m = model([bn_node("bn", "x", "y")], bn_params("bn", 3), {"x": [None, 3, 8, 8]}, {"y": None})
    result = fold(m)
    assert result.layers[0].method == "rewritten_as_affine"
    assert op_types(result.model) == ["Mul", "Add"]
    assert_same(m, result.model, {"x": rand(2, 3, 8, 8)})


def test_bn_after_activation_is_an_affine():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("bn", "r", "y")]
    m = model(nodes, bn_params("bn", 3), {"x": [None, 3, 4, 4]}, {"y": None})
    result = fold(m)
    assert result.layers[0].method == "rewritten_as_affine"
    assert_same(m, result.model, {"x": rand(2, 3, 4, 4)})


def test_producer_with_other_consumers_keeps_them_unchanged():
    """Conv output read by BN and by a residual branch: the branch must still see the raw conv."""
    inits = [const("w", rand(4, 4, 3, 3)), *bn_params("bn", 4)]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("bn", "c", "b"),
        helper.make_node("Sigmoid", ["c"], ["side"], name="side"),
        helper.make_node("Add", ["b", "side"], ["y"], name="join"),
    ]
    m = model(nodes, inits, {"x": [None, 4, 6, 6]}, {"y": None})
    result = fold(m)
    assert result.layers[0].method == "rewritten_as_affine"
    assert "other consumers" in result.layers[0].reason
    assert_same(m, result.model, {"x": rand(2, 4, 6, 6)})


def test_producer_that_is_a_graph_output_is_not_changed():
    inits = [const("w", rand(4, 3, 1, 1)), *bn_params("bn", 4)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("bn", "c", "y")]
    m = model(nodes, inits, {"x": [None, 3, 5, 5]}, {"c": None, "y": None})
    result = fold(m)
    assert result.layers[0].method == "rewritten_as_affine"
    assert "graph output" in result.layers[0].reason
    assert_same(m, result.model, {"x": rand(2, 3, 5, 5)})


@pytest.mark.parametrize("groups", [1, 2])
def test_bn_folds_forward_into_an_unpadded_conv(groups):
    inits = [*bn_params("bn", 4), const("w", rand(6, 4 // groups, 3, 3)), const("b", rand(6))]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        bn_node("bn", "r", "n"),
        helper.make_node("Conv", ["n", "w", "b"], ["y"], name="conv", group=groups),
    ]
    m = model(nodes, inits, {"x": [None, 4, 7, 7]}, {"y": None})
    result = fold(m)
    assert result.layers[0].method == "folded_forward_into_conv"
    assert op_types(result.model) == ["Relu", "Conv"]
    assert_same(m, result.model, {"x": rand(2, 4, 7, 7)})


def test_bn_does_not_fold_forward_into_a_zero_padded_conv():
    """Padding pads the normalized input with zeros; the folded conv would pad raw x."""
    inits = [*bn_params("bn", 4), const("w", rand(6, 4, 3, 3))]
    nodes = [
        bn_node("bn", "x", "n"),
        helper.make_node("Conv", ["n", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    m = model(nodes, inits, {"x": [None, 4, 5, 5]}, {"y": None})
    result = fold(m)
    assert result.layers[0].method == "rewritten_as_affine"
    assert_same(m, result.model, {"x": rand(2, 4, 5, 5)})


@pytest.mark.parametrize("trans_b", [0, 1])
def test_bn1d_folds_forward_into_gemm(trans_b):
    weight = rand(3, 5) if trans_b else rand(5, 3)
    inits = [*bn_params("bn", 5), const("w", weight), const("c", rand(3))]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        bn_node("bn", "r", "n"),
        helper.make_node("Gemm", ["n", "w", "c"], ["y"], transB=trans_b, alpha=1.5, beta=0.5),
    ]
    m = model(nodes, inits, {"x": [None, 5]}, {"y": None})
    result = fold(m)
    assert result.layers[0].method == "folded_forward_into_gemm"
    assert_same(m, result.model, {"x": rand(4, 5)})


# -- rule 5: per-channel Mul/Add after Conv (FrozenBatchNorm) --------------------------------


@pytest.mark.parametrize("scale_shape", [(1, 4, 1, 1), (4, 1, 1), (1,)])
def test_frozen_bn_affine_after_conv_folds(scale_shape):
    inits = [
        const("w", rand(4, 3, 3, 3)),
        const("scale", rand(*scale_shape, low=0.5, high=2)),
        const("shift", rand(*scale_shape)),
        const("offset", rand(1, 4, 1, 1)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Mul", ["scale", "c"], ["s"], name="mul"),
        helper.make_node("Add", ["s", "shift"], ["t"], name="add"),
        helper.make_node("Sub", ["t", "offset"], ["y"], name="sub"),
    ]
    m = model(nodes, inits, {"x": [None, 3, 6, 6]}, {"y": None})
    result = fold(m)
    assert op_types(result.model) == ["Conv"]
    assert [f.op_type for f in result.affine_folds] == ["Mul", "Add", "Sub"]
    assert_same(m, result.model, {"x": rand(2, 3, 6, 6)})


def test_trailing_axis_constant_after_conv_is_not_folded():
    """A (C,) constant on (N, C, H, W) broadcasts over W, not channels (here W == C)."""
    inits = [const("w", rand(4, 3, 1, 1)), const("scale", rand(4))]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Mul", ["c", "scale"], ["y"], name="mul"),
    ]
    m = model(nodes, inits, {"x": [None, 3, 4, 4]}, {"y": None})
    result = fold(m)
    assert op_types(result.model) == ["Conv", "Mul"]
    assert_same(m, result.model, {"x": rand(2, 3, 4, 4)})


# -- rule 6: shared initializers -------------------------------------------------------------


def test_shared_weight_is_copied_not_changed():
    weight = rand(4, 4, 3, 3)
    inits = [const("w", weight), *bn_params("bn", 4)]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        bn_node("bn", "c1", "y1"),
        helper.make_node("Conv", ["x", "w"], ["y2"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    m = model(nodes, inits, {"x": [None, 4, 5, 5]}, {"y1": None, "y2": None})
    result = fold(m)
    assert result.layers[0].method == "folded_into_conv"
    values = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    conv2 = next(n for n in result.model.graph.node if n.name == "conv2")
    assert conv2.input[1] == "w"
    assert values["w"].tobytes() == weight.tobytes()
    assert numpy_helper.to_array(m.graph.initializer[0]).tobytes() == weight.tobytes()
    assert_same(m, result.model, {"x": rand(2, 4, 5, 5)})


def test_chained_batch_norms_fold_into_one_conv():
    inits = [const("w", rand(4, 2, 3, 3)), *bn_params("bn1", 4), *bn_params("bn2", 4)]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        bn_node("bn1", "c", "b1"),
        bn_node("bn2", "b1", "y"),
    ]
    m = model(nodes, inits, {"x": [None, 2, 6, 6]}, {"y": None})
    result = fold(m)
    assert [layer.method for layer in result.layers] == ["folded_into_conv"] * 2
    assert_same(m, result.model, {"x": rand(2, 2, 6, 6)})


def test_affine_false_parameters_computed_from_shape_are_resolved():
    """torch.onnx builds affine=False scale/bias as Expand(CastLike(1.0), Shape(x)[1:2])."""
    inits = [
        const("w", rand(4, 2, 3, 3)),
        const("bn.running_mean", rand(4)),
        const("bn.running_var", rand(4, low=0.5, high=1.5)),
        const("one", np.array([1.0], np.float32)),
        const("zero", np.array([0.0], np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("CastLike", ["one", "c"], ["one_like"]),
        helper.make_node("Shape", ["c"], ["channels"], start=1, end=2),
        helper.make_node("Expand", ["one_like", "channels"], ["scale"]),
        helper.make_node("CastLike", ["zero", "c"], ["zero_like"]),
        helper.make_node("Expand", ["zero_like", "channels"], ["bias"]),
        helper.make_node(
            "BatchNormalization", ["c", "scale", "bias", "bn.running_mean", "bn.running_var"], ["y"]
        ),
    ]
    m = model(nodes, inits, {"x": [None, 2, 6, 6]}, {"y": None})
    result = fold(m)
    assert result.layers[0].method == "folded_into_conv"
    assert result.layers[0].layer == "bn"
    assert op_types(result.model) == ["Conv"]
    assert_same(m, result.model, {"x": rand(2, 2, 6, 6)})


# -- rule 8: batch statistics are never eval ---------------------------------------------------


def test_training_mode_bn_is_refused():
    m = model(
        [bn_node("bn", "x", "y", training_mode=1)],
        bn_params("bn", 3),
        {"x": [None, 3, 4, 4]},
        {"y": [None, 3, 4, 4]},
        opset=15,
    )
    with pytest.raises(BatchStatisticsError, match="training_mode=1") as info:
        fold_batch_norms(m)
    assert info.value.layers == ["bn"]


def test_bn_with_statistics_computed_from_the_batch_is_refused():
    """What torch.onnx emits for track_running_stats=False: ReduceMean over batch and space."""
    inits = [*bn_params("bn", 3)[:2], const("axes", np.array([0, 2, 3]))]
    nodes = [
        helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=0),
        helper.make_node("ReduceMean", ["x", "axes"], ["mean_k"], keepdims=1),
        helper.make_node("Sub", ["x", "mean_k"], ["centered"]),
        helper.make_node("Mul", ["centered", "centered"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["var"], keepdims=0),
        helper.make_node(
            "BatchNormalization", ["x", "bn.weight", "bn.bias", "mean", "var"], ["y"], name="bn"
        ),
    ]
    m = model(nodes, inits, {"x": [None, 3, 4, 4]}, {"y": None}, opset=18)
    with pytest.raises(BatchStatisticsError, match="batch statistics"):
        fold_batch_norms(m)


def test_bn_inside_a_subgraph_is_reported_unsupported():
    then_graph = helper.make_graph(
        [bn_node("bn", "x", "t")], "then", [], [helper.make_tensor_value_info("t", 1, None)]
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", 1, None)],
    )
    inits = [*bn_params("bn", 3), const("cond", np.array(True))]
    nodes = [
        helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)
    ]
    m = model(nodes, inits, {"x": [None, 3, 4]}, {"y": None})
    with pytest.raises(UnsupportedGraphError, match="subgraph"):
        fold_batch_norms(m)
