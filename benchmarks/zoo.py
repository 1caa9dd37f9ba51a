"""The architecture zoo: torchvision and timm models exported exactly, checked independently.

`python -m benchmarks.zoo` (`make zoo`) exports every model below into a temporary repository
and prints one table row per model: its BatchNorm layers, the rule that removed each, parity
against PyTorch float64, the source's own float32 error, batch independence, the export's time
per step, and how many BatchNormalization nodes each anchor tool leaves next to the Mul+Add
pairs bnserve leaves. `tests/test_zoo.py` runs the `ci=True` subset with the same checks.

Models are randomly initialized, given realistic statistics (random BN affines, then train-mode
passes on random data with cumulative averaging, so every BN normalizes what it really sees),
and exported in eval mode. The checks here do not read the export's own verification: they run
model.onnx with ONNX Runtime on fresh inputs against PyTorch eval of a float64 copy, each
sample alone against the batch, and the caller's model bit for bit.

torchvision and timm are installed with --no-deps (`make zoo-deps`) so that pip never swaps the
CPU torch for a CUDA build; the CPU torch has no torchvision operators, so `import_torchvision`
declares the nms/qnms schemas torchvision registers fake kernels for before importing it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import re
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.utils import _pytree

from service.runtime import SessionFactory

PARITY = 1e-4
CONDITIONING_FACTOR = 4.0  # export/verify.py's K, restated: these checks are independent
INDEPENDENCE = 1e-5
SIZE = 64  # small inputs keep the zoo fast; every model here runs at 64x64

_TORCHVISION_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARIES: list = []  # a torch.library.Library must stay alive for its definitions to hold


def import_torchvision():
    """torchvision on a CPU torch built without its operators: declare nms/qnms first."""
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    missing = {op: schema for op, schema in _TORCHVISION_SCHEMAS.items() if not _defined(op)}
    if missing:
        library = torch.library.Library("torchvision", "DEF")
        for schema in missing.values():
            library.define(schema)
        _LIBRARIES.append(library)
    import torchvision

    return torchvision


def _defined(op: str) -> bool:
    try:
        getattr(torch.ops.torchvision, op)
    except (AttributeError, RuntimeError):
        return False
    return True


@dataclass(frozen=True)
class ZooModel:
    name: str  # torchvision/<builder> or timm/<name>
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...] = (3, SIZE, SIZE)  # without the batch axis
    batch: int = 2
    ci: bool = False  # in the CI subset (tests/test_zoo.py)
    known_failure: str | None = None  # why verification refuses it, where bnserve is not at fault


def _tv(builder: str, module: str = "", **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        tv = import_torchvision()
        namespace = tv.models
        for part in filter(None, module.split(".")):
            namespace = getattr(namespace, part)
        return getattr(namespace, builder)(**kwargs)

    return build


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import_torchvision()
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10)

    return build


def _fpn_frozen_bn() -> nn.Module:
    """A detection backbone as torchvision's detectors build it: FrozenBatchNorm2d + FPN."""
    tv = import_torchvision()
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    return resnet_fpn_backbone(
        backbone_name="resnet18",
        weights=None,
        norm_layer=tv.ops.FrozenBatchNorm2d,
        trainable_layers=5,
    )


def _zoo() -> list[ZooModel]:
    seg = "segmentation"
    tv = [
        ZooModel("torchvision/resnet18", _tv("resnet18", num_classes=10), ci=True),
        ZooModel(  # the speed reference: export time split at full size
            "torchvision/resnet50@224", _tv("resnet50"), input_shape=(3, 224, 224)
        ),
        ZooModel("torchvision/resnext50_32x4d", _tv("resnext50_32x4d", num_classes=10)),
        ZooModel("torchvision/wide_resnet50_2", _tv("wide_resnet50_2", num_classes=10)),
        ZooModel("torchvision/mobilenet_v2", _tv("mobilenet_v2", num_classes=10)),
        ZooModel(
            "torchvision/mobilenet_v3_small", _tv("mobilenet_v3_small", num_classes=10), ci=True
        ),
        ZooModel("torchvision/efficientnet_b0", _tv("efficientnet_b0", num_classes=10), ci=True),
        ZooModel("torchvision/efficientnet_v2_s", _tv("efficientnet_v2_s", num_classes=10)),
        ZooModel("torchvision/regnet_y_400mf", _tv("regnet_y_400mf", num_classes=10)),
        ZooModel(
            "torchvision/shufflenet_v2_x0_5", _tv("shufflenet_v2_x0_5", num_classes=10), ci=True
        ),
        ZooModel("torchvision/mnasnet0_5", _tv("mnasnet0_5", num_classes=10)),
        ZooModel("torchvision/densenet121", _tv("densenet121", num_classes=10)),
        ZooModel(
            "torchvision/googlenet",
            _tv("googlenet", num_classes=10, aux_logits=False, init_weights=True),
        ),
        ZooModel(
            "torchvision/inception_v3",
            _tv("inception_v3", num_classes=10, aux_logits=False, init_weights=True),
            input_shape=(3, 80, 80),  # its minimum is 75x75
        ),
        ZooModel("torchvision/vgg11_bn", _tv("vgg11_bn", num_classes=10), input_shape=(3, 32, 32)),
        ZooModel(
            "torchvision/deeplabv3_mobilenet_v3_large",
            _tv("deeplabv3_mobilenet_v3_large", seg, num_classes=4, weights_backbone=None),
        ),
        ZooModel(
            "torchvision/fcn_resnet50",
            _tv("fcn_resnet50", seg, num_classes=4, weights_backbone=None),
        ),
        ZooModel(
            "torchvision/lraspp_mobilenet_v3_large",
            _tv("lraspp_mobilenet_v3_large", seg, num_classes=4, weights_backbone=None),
            ci=True,
        ),
        ZooModel("torchvision/fpn_resnet18_frozen_bn", _fpn_frozen_bn, ci=True),
        ZooModel(
            "torchvision/r3d_18",
            _tv("r3d_18", "video", num_classes=10),
            input_shape=(3, 4, 32, 32),
            ci=True,
        ),
    ]
    ci_timm = {"mixnet_s", "repvgg_a0", "nf_regnet_b0"}
    timm = [
        ZooModel(f"timm/{name}", _timm(name), ci=name in ci_timm)
        for name in (
            "efficientnet_b0",
            "mobilenetv3_small_050",
            "regnetx_002",
            "cspresnet50",
            "dla34",
            "hrnet_w18_small",
            "rexnet_100",
            "ghostnet_050",
            "repvgg_a0",
            "mixnet_s",
            "lcnet_050",
            "xception41",
            "resnest14d",
            "skresnet18",
            "tresnet_m",
            "dpn48b",
            "ese_vovnet19b_slim_dw",
            "nf_regnet_b0",  # NFNet family: ScaledStdConv2d (BN over the weight)
        )
    ]
    timm.append(
        ZooModel(
            "timm/resnetv2_50x1_bit",  # BiT: StdConv2d (BN over the weight) and GroupNorm
            _timm("resnetv2_50x1_bit"),
        )
    )
    return tv + timm


ZOO = _zoo()


def batch_norm_modules(model: nn.Module) -> list[nn.Module]:
    frozen = getattr(sys.modules.get("torchvision"), "ops", None)
    kinds: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm,)
    if frozen is not None:
        kinds += (frozen.FrozenBatchNorm2d,)
    return [m for m in model.modules() if isinstance(m, kinds)]


def with_statistics(model: nn.Module, entry: ZooModel, *, seed: int = 0) -> nn.Module:
    """Random BN affines and running statistics that describe what each layer sees, then eval.

    Cumulative averaging (momentum=None) over train-mode passes makes the statistics exact
    averages, as a long training run's are; FrozenBatchNorm2d gets plausible random ones.
    """
    generator = torch.Generator().manual_seed(seed)

    def uniform(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return torch.rand(t.shape, generator=generator) * (high - low) + low

    momenta = {}
    with torch.no_grad():
        for bn in batch_norm_modules(model):
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                if bn.affine:
                    bn.weight.copy_(uniform(bn.weight, 0.5, 1.5))
                    bn.bias.copy_(uniform(bn.bias, -0.2, 0.2))
                if bn.track_running_stats:
                    bn.reset_running_stats()
                    momenta[bn] = bn.momentum
                    bn.momentum = None
            else:  # FrozenBatchNorm2d: buffers only
                bn.weight.copy_(uniform(bn.weight, 0.5, 1.5))
                bn.bias.copy_(uniform(bn.bias, -0.2, 0.2))
                bn.running_mean.copy_(uniform(bn.running_mean, -0.2, 0.2))
                bn.running_var.copy_(uniform(bn.running_var, 0.5, 2.0))
        model.train()
        for _ in range(3):
            model(torch.randn(4, *entry.input_shape, generator=generator))
    for bn, momentum in momenta.items():
        bn.momentum = momentum
    return model.eval()


@dataclass
class ZooResult:
    name: str
    bn_modules: int = 0
    bn_nodes: int = 0  # BatchNormalization nodes in reference.onnx (F.batch_norm too)
    removed_by: Counter = field(default_factory=Counter)
    affine_left: int = 0  # BNs bnserve left as one Mul+Add
    constant_folds: int = 0
    affine_folds: int = 0  # Mul/Add by constants folded into convolutions (FrozenBatchNorm2d)
    parity: float = float("nan")  # model.onnx vs PyTorch float64, on fresh inputs
    source: float = float("nan")  # PyTorch float32 vs float64
    limit: float = PARITY
    independence: float = float("nan")
    bitwise: bool = False
    untouched: bool = False
    bn_left: int = -1
    seconds: dict[str, float] = field(default_factory=dict)
    anchors: dict[str, int | str] = field(default_factory=dict)
    error: str | None = None
    known_failure: str | None = None

    @property
    def passed(self) -> bool:
        return (
            self.error is None
            and self.untouched
            and self.bn_left == 0
            and self.parity <= self.limit
            and self.independence <= INDEPENDENCE
        )


def rel_error(got: list[np.ndarray], expected: list[np.ndarray]) -> float:
    worst = 0.0
    for g, e in zip(got, expected, strict=True):
        if g.shape != e.shape:
            return float("inf")
        e64 = e.astype(np.float64)
        scale = max(float(np.abs(e64).max(initial=0.0)), 1e-30)
        worst = max(worst, float(np.abs(g.astype(np.float64) - e64).max(initial=0.0)) / scale)
    return worst


def torch_outputs(model: nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        return [t.numpy() for t in _pytree.tree_flatten(model(x))[0]]


def _state(model: nn.Module):
    tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    return tensors, [(name, m.training) for name, m in model.named_modules()]


def _same(model: nn.Module, snapshot) -> bool:
    tensors, flags = snapshot
    now = model.state_dict(keep_vars=True)
    if flags != [(name, m.training) for name, m in model.named_modules()]:
        return False
    return now.keys() == tensors.keys() and all(
        now[k].dtype == v.dtype and torch.equal(now[k].detach(), v) for k, v in tensors.items()
    )


def check(entry: ZooModel, repository: Path, *, anchors: bool = False) -> ZooResult:
    """Export `entry` into `repository` and check it without reading the export's report."""
    from export import export_model

    result = ZooResult(entry.name, known_failure=entry.known_failure)
    torch.manual_seed(0)
    model = with_statistics(entry.build(), entry)
    result.bn_modules = len(batch_norm_modules(model))
    snapshot = _state(model)
    example = torch.randn(
        entry.batch, *entry.input_shape, generator=torch.Generator().manual_seed(1)
    )
    started = time.perf_counter()
    try:
        report = export_model(model, example, repository=repository, name=_slug(entry.name))
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        result.untouched = _same(model, snapshot)
        return result
    result.seconds = {"total": time.perf_counter() - started, **report.timings.model_dump()}
    result.untouched = _same(model, snapshot)
    result.removed_by = Counter(layer.removed_by for layer in report.batch_norm)
    result.affine_left = result.removed_by.get("rewritten_as_affine", 0)
    result.constant_folds = len(getattr(report, "constant_folds", []))
    result.affine_folds = len(report.affine_folds)

    version = Path(report.path)
    reference = onnx.load(str(version / "reference.onnx"))
    folded = onnx.load(str(version / "model.onnx"))
    result.bn_nodes = _bn_count(reference)
    result.bn_left = _bn_count(folded)
    # The service's own session options (Pad_Fusion off, deterministic): what would be served.
    session = SessionFactory("cpu", 0, 0).create(version / "model.onnx")
    fresh = torch.randn(
        max(entry.batch, 3), *entry.input_shape, generator=torch.Generator().manual_seed(2)
    )
    truth = torch_outputs(copy.deepcopy(model).double(), fresh.double())
    float32 = torch_outputs(copy.deepcopy(model), fresh)
    got = _run(session, fresh.numpy())
    result.parity = rel_error(got, truth)
    result.source = rel_error(float32, truth)
    result.limit = max(PARITY, CONDITIONING_FACTOR * result.source)
    alone = [_run(session, fresh[i : i + 1].numpy()) for i in range(fresh.shape[0])]
    joined = [np.concatenate(parts) for parts in zip(*alone, strict=True)]
    result.independence = rel_error(joined, got)
    result.bitwise = all(np.array_equal(a, b) for a, b in zip(joined, got, strict=True))
    result.untouched = result.untouched and _same(model, snapshot)
    if anchors:
        result.anchors = anchor_counts(model, example, reference)
    return result


def _run(session: ort.InferenceSession, x: np.ndarray) -> list[np.ndarray]:
    return session.run(None, {session.get_inputs()[0].name: x})


def _bn_count(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def anchor_counts(model: nn.Module, example: torch.Tensor, reference: onnx.ModelProto):
    """BatchNormalization nodes each anchor tool leaves (a string says why it could not run)."""
    counts: dict[str, int | str] = {}

    def attempt(label: str, run: Callable[[], onnx.ModelProto]) -> None:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                counts[label] = _bn_count(run())
        except ImportError:
            counts[label] = "n/a"
        except Exception as exc:
            counts[label] = f"failed ({type(exc).__name__})"

    def torch_optimized() -> onnx.ModelProto:
        program = torch.onnx.export(
            copy.deepcopy(model), (example,), dynamo=True, optimize=True, verbose=False
        )
        return program.model_proto

    def onnxsim_() -> onnx.ModelProto:
        import onnxsim

        return onnxsim.simplify(copy.deepcopy(reference))[0]

    def onnxslim_() -> onnx.ModelProto:
        import onnxslim

        return onnxslim.slim(copy.deepcopy(reference))

    def onnxoptimizer_() -> onnx.ModelProto:
        import onnxoptimizer

        return onnxoptimizer.optimize(copy.deepcopy(reference))

    attempt("torch optimize=True", torch_optimized)
    attempt("onnxsim", onnxsim_)
    attempt("onnxslim", onnxslim_)
    attempt("onnxoptimizer", onnxoptimizer_)
    return counts


# -- the table --------------------------------------------------------------------------------

SHORT = {
    "folded_into_conv": "conv",
    "folded_into_conv_transpose": "convT",
    "folded_into_gemm": "gemm",
    "folded_into_matmul": "matmul",
    "folded_into_concatenated_convs": "concat",
    "folded_forward_into_conv": "fwd-conv",
    "folded_forward_into_gemm": "fwd-gemm",
    "folded_forward_into_matmul": "fwd-matmul",
    "reparameterized_into_conv": "reparam",
    "rewritten_as_affine": "Mul+Add",
    "per_sample_normalization": "instance",
}
ANCHORS = ("torch optimize=True", "onnxsim", "onnxslim", "onnxoptimizer")


def row(r: ZooResult) -> str:
    if r.error is not None:
        known = f" (known: {r.known_failure})" if r.known_failure else ""
        return f"| {r.name} | {r.bn_modules} | **failed**: {r.error[:160]}{known} | | | | | | |"
    parts = [", ".join(f"{SHORT.get(k, k)} {v}" for k, v in sorted(r.removed_by.items()))]
    if r.affine_folds:
        parts.append(f"{r.affine_folds} Mul/Add into convs")
    if r.constant_folds:
        parts.append(f"{r.constant_folds} constants folded")
    how = "; ".join(p for p in parts if p)
    s = r.seconds
    seconds = f"{s['torch_export']:.1f} / {s['fold']:.2f} / {s['oracle'] + s['verify']:.1f}"
    anchors = " / ".join(str(r.anchors.get(a, "-")) for a in ANCHORS)
    parity = f"{r.parity:.1e}" + ("" if r.parity <= r.limit else " **FAIL**")
    independent = f"{r.independence:.0e}" + (" bitwise" if r.bitwise else "")
    independent += "" if r.independence <= INDEPENDENCE else " **FAIL**"
    return (
        f"| {r.name} | {r.bn_modules} / {r.bn_nodes} | {how} | {parity} | {r.source:.1e} | {independent} "
        f"| {'yes' if r.untouched else '**NO**'} | {seconds} | {anchors} / **{r.affine_left}** |"
    )


HEADER = (
    "| model | BN modules / nodes | removed by | parity vs fp64 | fp32 vs fp64 | batch indep. | untouched "
    "| s: torch export / fold / verify | BNs left: torch opt / onnxsim / onnxslim / "
    "onnxoptimizer / **bnserve Mul+Add** |\n"
    "| --- | ---: | --- | ---: | ---: | --- | --- | --- | --- |"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ci", action="store_true", help="only the CI subset")
    parser.add_argument("--no-anchors", action="store_true", help="skip the anchor tools")
    parser.add_argument("-k", help="only models whose name contains this")
    parser.add_argument("--skip", type=int, default=0, help="start at this index of the list")
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    entries = [e for e in ZOO if (not args.ci or e.ci) and (not args.k or args.k in e.name)]
    entries = entries[args.skip :]
    print(HEADER, flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bnserve-zoo-") as tmp:
        for entry in entries:
            results.append(check(entry, Path(tmp), anchors=not args.no_anchors))
            print(row(results[-1]), flush=True)
    failures = sum(not r.passed and not r.known_failure for r in results)
    known = sum(not r.passed and bool(r.known_failure) for r in results)
    for r in results:
        if r.error is None and "@" in r.name:  # the full-size speed reference
            split = ", ".join(f"{k} {v:.2f}" for k, v in r.seconds.items() if k != "total")
            print(f"\n{r.name} export seconds: {split} (total {r.seconds['total']:.1f})")
    ratios = [(r.parity / r.source, r.name) for r in results if r.error is None and r.source > 0]
    if ratios:
        worst, name = max(ratios)
        print(f"\nlargest (model.onnx vs fp64) / (PyTorch fp32 vs fp64): {worst:.2f} ({name})")
        conditioned = [r.name for r in results if r.error is None and r.limit > PARITY]
        print(f"models whose own float32 error set the limit above 1e-4: {conditioned or 'none'}")
    print(
        f"\n{len(entries) - failures - known}/{len(entries)} models exported exactly and passed "
        "the independent checks (parity vs PyTorch float64 <= max(1e-4, 4 x fp32's own error), "
        f"batch independence <= 1e-5, source model untouched); {known} known failure(s)."
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
