"""Random PyTorch architectures through export.export_model, against PyTorch itself.

hypothesis builds networks from blocks that each exercise one fold rule (Conv 1d/2d/3d with any
stride, dilation, groups and padding, ConvTranspose, Linear + BatchNorm1d on (N, C), Linear on
(N, C, L) with L == C, input-side BN, BN after an activation, BN whose producer feeds a residual
branch or is a model output, BN before an unpadded conv, FrozenBatchNorm-style affines) and
randomizes every BatchNorm (running statistics, affine parameters, eps, affine=False,
momentum=None) so that an identity BN cannot hide a bug.

The oracle is the model's own eval forward, run here on fresh inputs of another batch size than
the export example; the numbers the exporter reports about itself are never trusted.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

import export

PARITY = 1e-4  # relative to the largest |output|, as documented in export/verify.py
INDEPENDENCE = 1e-5
EXAMPLE_BATCH = 3
TEST_BATCH = 5

SETTINGS = settings(
    max_examples=2,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # each example costs seconds: no shrinking
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_TRANSPOSE = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
}
SIZES = {1: (5, 12), 2: (4, 9), 3: (3, 5)}

BACKWARD = {"folded_into_conv"}
BACKWARD_TRANSPOSE = {"folded_into_conv_transpose"}
BACKWARD_LINEAR = {"folded_into_gemm", "folded_into_matmul"}
FORWARD_LINEAR = {"folded_forward_into_gemm", "folded_forward_into_matmul"}
AFFINE = {"rewritten_as_affine"}
# A BN without a foldable producer: folded forward when its only reader allows it, else affine.
NOT_BACKWARD = AFFINE | {"folded_forward_into_conv"} | FORWARD_LINEAR


# -- modules ----------------------------------------------------------------------------------


class FrozenBatchNorm(nn.Module):
    """torchvision's FrozenBatchNorm2d for any rank: x * scale + shift with fixed buffers."""

    def __init__(self, channels: int, dims: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.eps, self.dims = eps, dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        shape = (1, -1) + (1,) * self.dims
        return x * scale.reshape(shape) + shift.reshape(shape)


class Sequence(nn.Module):
    """Modules in order; `bn` is the layer under test (named blocks.<i>.bn)."""

    def __init__(self, **parts: nn.Module) -> None:
        super().__init__()
        for name, part in parts.items():
            self.add_module(name, part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for part in self.children():
            x = part(x)
        return x


class Residual(nn.Module):
    """bn(c) + c: the BN's producer also feeds the other branch, which must see it unchanged."""

    def __init__(self, op: nn.Module, bn: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.op, self.bn, self.act = op, bn, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.op(x)
        return self.act(self.bn(c)) + c


class Tap(nn.Module):
    """The BN's producer is also a model output."""

    def __init__(self, op: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.op, self.bn = op, bn

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.op(x)
        return self.bn(c), c


class LastAxisLinear(nn.Module):
    """Linear over L on (N, C, L) followed by BatchNorm1d(C): the misfold trap when L == C."""

    def __init__(self, linear: nn.Linear, bn: nn.Module) -> None:
        super().__init__()
        self.linear, self.bn = linear, bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(x))


class Pool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=tuple(range(2, x.dim())))


class Net(nn.Module):
    def __init__(self, input_bn: nn.Module | None, blocks: list[nn.Module], head) -> None:
        super().__init__()
        self.input_bn = input_bn
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def forward(self, x: torch.Tensor):
        if self.input_bn is not None:
            x = self.input_bn(x)
        taps = []
        for block in self.blocks:
            x = block(x)
            if isinstance(x, tuple):
                x, tap = x
                taps.append(tap)
        if self.head is not None:
            x = self.head(x)
        return (x, *taps) if taps else x


# -- strategies -------------------------------------------------------------------------------


@st.composite
def bn_options(draw, affine: bool | None = None, momentum=...) -> dict:
    return {
        "affine": draw(st.booleans()) if affine is None else affine,
        "momentum": draw(st.sampled_from([0.1, None, 0.03])) if momentum is ... else momentum,
        "eps": draw(st.sampled_from([1e-5, 1e-3, 0.1])),
    }


@st.composite
def conv_options(draw, dims, cin, size, *, padded=True, same=False, depthwise=None) -> dict:
    """Conv2d-style options whose output has at least one position."""
    if same:  # stride 1, output size == input size, channels kept
        dilation = draw(st.integers(1, 2))
        groups = draw(st.sampled_from([g for g in range(1, cin + 1) if cin % g == 0]))
        return {
            "cout": cin,
            "k": 3,
            "stride": 1,
            "dilation": dilation,
            "padding": dilation,
            "groups": groups,
            "bias": draw(st.booleans()),
        }
    k = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.integers(0, dilation * (k - 1) // 2 + 1)) if padded else 0
    if size + 2 * padding < dilation * (k - 1) + 1:
        k = 1
    if depthwise is None:
        depthwise = draw(st.booleans())
    if depthwise:
        groups, cout = cin, cin * draw(st.sampled_from([1, 2]))
    else:
        cout = draw(st.integers(2, 8))
        common = [g for g in range(1, min(cin, cout) + 1) if cin % g == 0 and cout % g == 0]
        groups = draw(st.sampled_from(common))
    return {
        "cout": cout,
        "k": k,
        "stride": stride,
        "dilation": dilation,
        "padding": padding,
        "groups": groups,
        "bias": draw(st.booleans()),
    }


def conv_size(size: int, o: dict) -> int:
    return (size + 2 * o["padding"] - o["dilation"] * (o["k"] - 1) - 1) // o["stride"] + 1


@st.composite
def conv_transpose_options(draw, cin) -> dict:
    k = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    cout = draw(st.integers(2, 8))
    common = [g for g in range(1, min(cin, cout) + 1) if cin % g == 0 and cout % g == 0]
    return {
        "cout": cout,
        "k": k,
        "stride": stride,
        "dilation": dilation,
        "padding": draw(st.integers(0, dilation * (k - 1) // 2)),
        "output_padding": draw(st.integers(0, max(stride, dilation) - 1)),
        "groups": draw(st.sampled_from(common)),
        "bias": draw(st.booleans()),
    }


def conv_transpose_size(size: int, o: dict) -> int:
    return (
        (size - 1) * o["stride"]
        - 2 * o["padding"]
        + o["dilation"] * (o["k"] - 1)
        + o["output_padding"]
        + 1
    )


SPATIAL_KINDS = [
    "conv_bn",
    "conv_transpose_bn",
    "act_bn",
    "residual_bn",
    "tap_bn",
    "forward_bn",
    "frozen_bn",
]
FLAT_KINDS = ["linear_bn", "act_bn", "residual_bn", "tap_bn", "forward_bn"]


@st.composite
def spatial_block(draw, kind, dims, channels, size, *, bn=None, depthwise=None) -> tuple:
    """One block recipe for (N, C, *spatial) activations; returns it with the new C and size."""
    bn = bn or draw(bn_options())
    recipe: dict = {"kind": kind, "bn": bn}
    if kind in ("conv_bn", "tap_bn", "frozen_bn"):
        recipe["conv"] = draw(conv_options(dims, channels, size, depthwise=depthwise))
        channels, size = recipe["conv"]["cout"], conv_size(size, recipe["conv"])
    elif kind == "conv_transpose_bn":
        recipe["conv"] = draw(conv_transpose_options(channels))
        channels, size = recipe["conv"]["cout"], conv_transpose_size(size, recipe["conv"])
    elif kind == "act_bn":
        recipe["act"] = draw(st.sampled_from(sorted(ACTIVATIONS)))
    elif kind == "residual_bn":
        recipe["conv"] = draw(conv_options(dims, channels, size, same=True))
        recipe["act"] = draw(st.sampled_from(sorted(ACTIVATIONS)))
    elif kind == "forward_bn":  # act -> BN -> Conv without padding: BN folds forward
        recipe["act"] = draw(st.sampled_from(sorted(ACTIVATIONS)))
        recipe["conv"] = draw(conv_options(dims, channels, size, padded=False, depthwise=depthwise))
        channels, size = recipe["conv"]["cout"], conv_size(size, recipe["conv"])
    return recipe, channels, size


@st.composite
def spatial_network(draw, required: str) -> dict:
    """A network on (N, C, *spatial) with at least one block of the required kind."""
    dims = {"conv1d_bn": 1, "conv2d_bn": 2, "conv3d_bn": 3}.get(required) or draw(st.integers(1, 3))
    channels = draw(st.integers(2, 6))
    size = draw(st.integers(*SIZES[dims]))
    shape = (channels, *([size] * dims))
    required_kind = {
        "conv1d_bn": "conv_bn",
        "conv2d_bn": "conv_bn",
        "conv3d_bn": "conv_bn",
        "depthwise_conv_bn": "conv_bn",
        "input_bn": None,
    }.get(required, required)
    extra = draw(st.lists(st.sampled_from(SPATIAL_KINDS), max_size=2))
    position = draw(st.integers(0, len(extra)))
    kinds = extra[:position] + ([required_kind] if required_kind else []) + extra[position:]
    input_bn = draw(bn_options()) if required == "input_bn" or draw(st.booleans()) else None
    blocks = []
    for i, drawn in enumerate(kinds):
        kind = drawn
        forced = i == position and required_kind is not None
        bn = None
        if forced and required == "conv1d_bn":
            bn = draw(bn_options(affine=False))
        if forced and required == "conv2d_bn":
            bn = draw(bn_options(momentum=None))
        depthwise = True if forced and required == "depthwise_conv_bn" else None
        if kind == "conv_transpose_bn" and dims == 3 and size > 4:
            kind = "conv_bn"  # keep 3d activations small
        block, channels, size = draw(
            spatial_block(kind, dims, channels, size, bn=bn, depthwise=depthwise)
        )
        blocks.append(block)
    head = draw(st.sampled_from(["none", "linear_bn", "bn_linear"]))
    head_recipe = {"kind": head, "features": draw(st.integers(2, 8)), "bn": draw(bn_options())}
    return {
        "family": "spatial",
        "dims": dims,
        "shape": shape,
        "input_bn": input_bn,
        "blocks": blocks,
        "head": head_recipe,
        "seed": draw(st.integers(0, 2**16)),
    }


@st.composite
def flat_network(draw, required: str) -> dict:
    """A network on (N, C): Linear layers with BatchNorm1d."""
    features = draw(st.integers(2, 10))
    extra = draw(st.lists(st.sampled_from(FLAT_KINDS), max_size=2))
    position = draw(st.integers(0, len(extra)))
    kinds = [*extra[:position], required, *extra[position:]]
    blocks = []
    for kind in kinds:
        out = draw(st.integers(2, 10)) if kind in ("linear_bn", "tap_bn", "forward_bn") else None
        blocks.append(
            {
                "kind": kind,
                "features": features,
                "out": out,
                "bias": draw(st.booleans()),
                "act": draw(st.sampled_from(sorted(ACTIVATIONS))),
                "bn": draw(bn_options()),
            }
        )
        features = out or features
    return {
        "family": "flat",
        "shape": (blocks[0]["features"],),
        "input_bn": draw(bn_options()) if draw(st.booleans()) else None,
        "blocks": blocks,
        "seed": draw(st.integers(0, 2**16)),
    }


@st.composite
def ncl_network(draw) -> dict:
    """Linear over the last axis of (N, C, L) with L == C, then BatchNorm1d(C)."""
    c = draw(st.integers(2, 8))
    blocks = []
    kinds = draw(st.lists(st.sampled_from(["same_conv_bn", "act_bn"]), max_size=2))
    kinds.insert(draw(st.integers(0, len(kinds))), "ncl_linear_bn")
    if draw(st.booleans()):
        kinds.append("ncl_linear_bn")
    for kind in kinds:
        recipe = {"kind": kind, "bn": draw(bn_options()), "bias": draw(st.booleans())}
        if kind == "same_conv_bn":
            recipe["conv"] = draw(conv_options(1, c, c, same=True))
        recipe["act"] = draw(st.sampled_from(sorted(ACTIVATIONS)))
        blocks.append(recipe)
    return {
        "family": "ncl",
        "shape": (c, c),
        "input_bn": draw(bn_options()) if draw(st.booleans()) else None,
        "blocks": blocks,
        "seed": draw(st.integers(0, 2**16)),
    }


# -- building ---------------------------------------------------------------------------------


def make_bn(cls, channels: int, options: dict, gen: torch.Generator) -> nn.Module:
    bn = cls(channels, eps=options["eps"], momentum=options["momentum"], affine=options["affine"])
    randomize_bn(bn, gen)
    return bn


def randomize_bn(bn, gen: torch.Generator) -> None:
    with torch.no_grad():
        bn.running_mean.uniform_(-1.0, 1.0, generator=gen)
        bn.running_var.uniform_(0.2, 2.0, generator=gen)
        bn.num_batches_tracked.fill_(int(torch.randint(0, 1000, (), generator=gen)))
        if bn.affine:
            sign = torch.randint(0, 2, bn.weight.shape, generator=gen) * 2 - 1
            bn.weight.uniform_(0.5, 1.5, generator=gen).mul_(sign)
            bn.bias.uniform_(-1.0, 1.0, generator=gen)


def make_conv(dims: int, cin: int, o: dict, transpose: bool = False) -> nn.Module:
    if transpose:
        return CONV_TRANSPOSE[dims](
            cin,
            o["cout"],
            o["k"],
            stride=o["stride"],
            padding=o["padding"],
            output_padding=o["output_padding"],
            groups=o["groups"],
            bias=o["bias"],
            dilation=o["dilation"],
        )
    return CONV[dims](
        cin,
        o["cout"],
        o["k"],
        stride=o["stride"],
        padding=o["padding"],
        dilation=o["dilation"],
        groups=o["groups"],
        bias=o["bias"],
    )


def build(spec: dict) -> tuple[nn.Module, dict[str, set[str]], int]:
    """The network, the removal methods allowed for each BN module, and the Mul/Add count of
    FrozenBatchNorm-style affines that must be folded into convolutions."""
    with torch.random.fork_rng():
        torch.manual_seed(spec["seed"])
        gen = torch.Generator().manual_seed(spec["seed"])
        return _build(spec, gen)


def _build(spec: dict, gen: torch.Generator):
    expected: dict[str, set[str]] = {}
    frozen = 0
    family = spec["family"]
    dims = spec.get("dims", 1)
    bn_cls = BATCH_NORM[dims] if family != "flat" else nn.BatchNorm1d
    channels = spec["shape"][0]
    input_bn = None
    if spec["input_bn"] is not None:
        input_bn = make_bn(bn_cls, channels, spec["input_bn"], gen)
        expected["input_bn"] = NOT_BACKWARD
    blocks: list[nn.Module] = []
    for i, r in enumerate(spec["blocks"]):
        name, kind = f"blocks.{i}.bn", r["kind"]
        act = ACTIVATIONS[r["act"]]() if "act" in r else None
        if family == "flat":
            f, out = r["features"], r["out"]
            if kind == "linear_bn":
                block = Sequence(
                    op=nn.Linear(f, out, bias=r["bias"]), bn=make_bn(bn_cls, out, r["bn"], gen)
                )
                expected[name] = BACKWARD_LINEAR
            elif kind == "act_bn":
                block = Sequence(act=act, bn=make_bn(bn_cls, f, r["bn"], gen))
                expected[name] = NOT_BACKWARD
            elif kind == "residual_bn":
                block = Residual(
                    nn.Linear(f, f, bias=r["bias"]), make_bn(bn_cls, f, r["bn"], gen), act
                )
                expected[name] = AFFINE
            elif kind == "tap_bn":
                block = Tap(nn.Linear(f, out, bias=r["bias"]), make_bn(bn_cls, out, r["bn"], gen))
                expected[name] = NOT_BACKWARD
            else:  # forward_bn: BN1d read only by a Linear
                block = Sequence(
                    act=act,
                    bn=make_bn(bn_cls, f, r["bn"], gen),
                    op=nn.Linear(f, out, bias=r["bias"]),
                )
                expected[name] = FORWARD_LINEAR
        elif family == "ncl":
            if kind == "ncl_linear_bn":
                linear = nn.Linear(channels, channels, bias=r["bias"])
                block = LastAxisLinear(linear, make_bn(bn_cls, channels, r["bn"], gen))
                expected[name] = AFFINE
            elif kind == "same_conv_bn":
                conv = make_conv(1, channels, r["conv"])
                block = Sequence(op=conv, bn=make_bn(bn_cls, channels, r["bn"], gen))
                expected[name] = BACKWARD
            else:
                block = Sequence(act=act, bn=make_bn(bn_cls, channels, r["bn"], gen))
                expected[name] = NOT_BACKWARD
        else:
            cin = channels
            if "conv" in r:
                channels = r["conv"]["cout"]
            if kind == "conv_bn":
                block = Sequence(
                    op=make_conv(dims, cin, r["conv"]), bn=make_bn(bn_cls, channels, r["bn"], gen)
                )
                expected[name] = BACKWARD
            elif kind == "conv_transpose_bn":
                conv = make_conv(dims, cin, r["conv"], transpose=True)
                block = Sequence(op=conv, bn=make_bn(bn_cls, channels, r["bn"], gen))
                expected[name] = BACKWARD_TRANSPOSE
            elif kind == "act_bn":
                block = Sequence(act=act, bn=make_bn(bn_cls, channels, r["bn"], gen))
                expected[name] = NOT_BACKWARD
            elif kind == "residual_bn":
                conv = make_conv(dims, cin, r["conv"])
                block = Residual(conv, make_bn(bn_cls, channels, r["bn"], gen), act)
                expected[name] = AFFINE
            elif kind == "tap_bn":
                conv = make_conv(dims, cin, r["conv"])
                block = Tap(conv, make_bn(bn_cls, channels, r["bn"], gen))
                expected[name] = NOT_BACKWARD
            elif kind == "forward_bn":
                block = Sequence(
                    act=act,
                    bn=make_bn(bn_cls, cin, r["bn"], gen),
                    op=make_conv(dims, cin, r["conv"]),
                )
                expected[name] = {"folded_forward_into_conv"}
            else:  # frozen_bn: no BatchNorm module, a per-channel Mul and Add after a conv
                frozen_bn = FrozenBatchNorm(channels, dims, eps=r["bn"]["eps"])
                randomize_bn_buffers(frozen_bn, gen)
                block = Sequence(op=make_conv(dims, cin, r["conv"]), frozen=frozen_bn)
                frozen += 2
        blocks.append(block)
        if family == "flat" and r["out"]:
            channels = r["out"]
    head = None
    if family == "spatial" and spec["head"]["kind"] != "none":
        h = spec["head"]
        if h["kind"] == "linear_bn":
            bn = make_bn(nn.BatchNorm1d, h["features"], h["bn"], gen)
            head = Sequence(pool=Pool(), op=nn.Linear(channels, h["features"]), bn=bn)
            expected["head.bn"] = BACKWARD_LINEAR
        else:
            bn = make_bn(nn.BatchNorm1d, channels, h["bn"], gen)
            head = Sequence(pool=Pool(), bn=bn, op=nn.Linear(channels, h["features"]))
            expected["head.bn"] = FORWARD_LINEAR
    return Net(input_bn, blocks, head).eval(), expected, frozen


def randomize_bn_buffers(frozen: FrozenBatchNorm, gen: torch.Generator) -> None:
    with torch.no_grad():
        frozen.running_mean.uniform_(-1.0, 1.0, generator=gen)
        frozen.running_var.uniform_(0.2, 2.0, generator=gen)
        frozen.weight.uniform_(0.5, 1.5, generator=gen)
        frozen.bias.uniform_(-1.0, 1.0, generator=gen)


# -- the check --------------------------------------------------------------------------------


def rel_error(got: np.ndarray, expected: np.ndarray) -> float:
    assert got.shape == expected.shape
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-12)
    return float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max()) / scale


def outputs_of(result) -> list[np.ndarray]:
    items = result if isinstance(result, tuple) else (result,)
    return [t.detach().numpy() for t in items]


def check_export(spec: dict) -> None:
    model, expected_methods, frozen_ops = build(spec)
    shape = spec["shape"]
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    example = torch.randn(EXAMPLE_BATCH, *shape, generator=gen) * 2 + 0.5
    fresh = torch.randn(TEST_BATCH, *shape, generator=gen) * 2 + 0.5
    modules = {
        n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    assert set(modules) == set(expected_methods)

    with tempfile.TemporaryDirectory() as repository:
        report = export.export_model(model, example, repository=repository, name="random")
        folded = onnx.load(str(Path(report.path) / "model.onnx"))

    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    session = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    with torch.no_grad():
        expected = outputs_of(model.eval()(fresh))
    got = session.run(None, {input_name: fresh.numpy()})
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert rel_error(g, e) <= PARITY, f"parity {rel_error(g, e):.3g} for {spec}"

    for i in range(TEST_BATCH):
        alone = session.run(None, {input_name: fresh[i : i + 1].numpy()})
        for a, g in zip(alone, got, strict=True):
            assert rel_error(a, g[i : i + 1]) <= INDEPENDENCE, f"sample {i} depends on the batch"

    # The card: one entry per BatchNorm module, by its module path, removed by the right rule.
    layers = {layer.name: layer for layer in report.batch_norm}
    assert set(layers) == set(modules)
    for name, bn in modules.items():
        layer = layers[name]
        assert layer.removed_by in expected_methods[name], (name, layer.removed_by, spec)
        assert layer.channels == bn.num_features
        assert layer.eps == pytest.approx(bn.eps)
        assert layer.momentum == (None if bn.momentum is None else pytest.approx(bn.momentum))
        assert layer.num_batches_tracked == int(bn.num_batches_tracked)
        assert layer.affine == bn.affine
        assert layer.statistics == "running"
    folded_ops = [(f.op_type) for f in report.affine_folds]
    assert len(folded_ops) >= frozen_ops, f"FrozenBatchNorm affines left unfolded: {folded_ops}"


# Each test case holds at least one block of the named kind, somewhere among random others, so
# every rule is exercised on every run; conv1d_bn's BN has affine=False, conv2d_bn's momentum=None.
SPATIAL_REQUIRED = [
    "conv1d_bn",
    "conv2d_bn",
    "conv3d_bn",
    "depthwise_conv_bn",
    "conv_transpose_bn",
    "input_bn",
    "act_bn",
    "residual_bn",
    "tap_bn",
    "forward_bn",
    "frozen_bn",
]


@pytest.mark.parametrize("required", SPATIAL_REQUIRED)
@SETTINGS
@given(data=st.data())
def test_random_convolutional_network(required, data):
    check_export(data.draw(spatial_network(required), label="spec"))


@pytest.mark.parametrize("required", ["linear_bn", "forward_bn"])
@SETTINGS
@given(data=st.data())
def test_random_linear_network_on_n_c(required, data):
    check_export(data.draw(flat_network(required), label="spec"))


@SETTINGS
@given(data=st.data())
def test_linear_on_n_c_l_with_l_equal_c_is_not_misfolded(data):
    check_export(data.draw(ncl_network(), label="spec"))
