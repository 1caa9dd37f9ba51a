"""Command line: python -m export {pytorch,onnx,recalibrate,demo}.

Errors print one line (`error: what is wrong; expected ...`) and exit 1; nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .card import ExportReport
from .errors import ExportError, InvalidInputError

EXIT_ERROR = 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out, err = Console(), Console(stderr=True, log_path=False)
    try:
        with err.status("Starting", spinner="dots") as status:

            def progress(step: str) -> None:
                err.log(step)
                status.update(step)

            report = args.handler(args, progress)
    except ExportError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        err.print("error: interrupted; nothing was written", markup=False)
        return 130
    if report is not None:
        _summary(out, report)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a model with every BatchNorm folded into the bnserve model repository.",
    )
    sub = parser.add_subparsers(required=True, metavar="{pytorch,onnx,recalibrate,demo}")

    p = sub.add_parser("pytorch", help="export a PyTorch model (factory + weights, or .pt2)")
    p.add_argument("--factory", help="pkg.module:callable returning the torch.nn.Module")
    p.add_argument(
        "--weights",
        type=Path,
        help="state_dict file (torch.load weights_only) or torch.export .pt2",
    )
    p.add_argument(
        "--input-shape",
        action="append",
        required=True,
        type=_shape,
        help="shape of one input without the batch axis, e.g. 3,224,224 (repeat per input)",
    )
    p.add_argument("--batch-size", type=int, default=2, help="batch of the example input")
    p.add_argument("--batch-stats", choices=["error", "instance", "calibrate"], default="error")
    p.add_argument("--calibration", type=Path, help=".pt or .npy tensor of calibration inputs")
    p.add_argument("--recalibrate", action="store_true", help="recompute all BN statistics")
    _common(p)
    p.set_defaults(handler=_pytorch)

    o = sub.add_parser("onnx", help="fold an existing ONNX model")
    o.add_argument("source", type=Path)
    o.add_argument("--input-shape", action="append", type=_shape, help="verification shape")
    _common(o)
    o.set_defaults(handler=_onnx)

    r = sub.add_parser(
        "recalibrate",
        help="new version with BN statistics measured on captured traffic (PreciseBN)",
    )
    r.add_argument("--source", type=Path, required=True, help="models/<name>/<version>")
    r.add_argument(
        "--calibration",
        type=Path,
        required=True,
        help="capture folder (<capture_dir>/<model>/<version>/<capture_id>, or a folder above "
        "it holding exactly one capture)",
    )
    r.add_argument("--factory", help="pkg.module:callable: measure through PyTorch instead")
    r.add_argument("--weights", type=Path, help="state_dict (or .pt2) for --factory")
    r.add_argument("--repository", type=Path, help="default: the source version's repository")
    r.add_argument("--version", type=int, help="version number (default: next free)")
    r.set_defaults(handler=_recalibrate)

    d = sub.add_parser("demo", help="train the digits CNN and export it as models/digits/1")
    d.add_argument("--repository", type=Path, default=Path("models"))
    d.add_argument("--version", type=int, default=1)
    d.add_argument("--epochs", type=int, default=12)
    d.set_defaults(handler=_demo)
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument("--version", type=int, help="version number (default: next free)")
    p.add_argument("--repository", type=Path, default=Path("models"))
    p.add_argument("--labels", type=Path, help="text file, one class label per line")
    p.add_argument(
        "--parity-tolerance",
        type=float,
        help="accept parity errors up to this (relative to max |output|) instead of the "
        "conditioning-aware limit; recorded in model.json",
    )


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split(",") if d.strip())
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a shape; expected positive integers like 3,224,224"
        )
    return dims


def _labels(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise InvalidInputError(f"cannot read labels file {path}: {exc.strerror}") from exc


def _pytorch(args, progress) -> ExportReport:
    import torch

    from .loading import load_model, load_tensor
    from .pytorch import export_model

    model = load_model(args.factory, args.weights)
    example = tuple(torch.randn(args.batch_size, *shape) for shape in args.input_shape)
    calibration = load_tensor(args.calibration) if args.calibration else None
    return export_model(
        model,
        example,
        repository=args.repository,
        name=args.name,
        version=args.version,
        batch_stats=args.batch_stats,
        calibration=calibration,
        recalibrate=args.recalibrate,
        labels=_labels(args.labels),
        parity_tolerance=args.parity_tolerance,
        progress=progress,
    )


def _onnx(args, progress) -> ExportReport:
    from .onnx_source import fold_onnx

    return fold_onnx(
        args.source,
        repository=args.repository,
        name=args.name,
        version=args.version,
        input_shapes=args.input_shape,
        labels=_labels(args.labels),
        parity_tolerance=args.parity_tolerance,
        progress=progress,
    )


def _recalibrate(args, progress) -> ExportReport:
    from .recalibrate import recalibrate

    return recalibrate(
        args.source,
        args.calibration,
        repository=args.repository,
        version=args.version,
        factory=args.factory,
        weights=args.weights,
        progress=progress,
    )


def _demo(args, progress) -> ExportReport | None:
    from .demo import run_demo

    report, accuracy = run_demo(
        args.repository, version=args.version, epochs=args.epochs, progress=progress
    )
    if report is None:
        print(f"{args.repository / 'digits' / str(args.version)} already exists; nothing to do")
    else:
        print(f"digits CNN test accuracy: {accuracy:.4f}")
    return report


def _summary(console: Console, report: ExportReport) -> None:
    table = Table(title=f"{report.name} v{report.version}: BatchNorm layers", title_justify="left")
    for column in ("layer", "channels", "statistics", "removed by", "into / note"):
        table.add_column(column)
    for layer in report.batch_norm:
        table.add_row(
            layer.name,
            str(layer.channels),
            layer.statistics,
            layer.removed_by,
            layer.folded_into or layer.note or "",
        )
    console.print(table)
    v = report.verification
    checks = Table(title="verification", title_justify="left", show_header=False)
    checks.add_row("oracle", f"{v.oracle} on {v.samples} samples ({v.execution_provider})")
    limit = f"limit {v.tolerances['parity_rel_error']:.1e}, {v.parity_rule}"
    if v.float64_rel_error is None:
        checks.add_row("parity (rel. to max |output|)", f"{v.parity_rel_error:.2e} ({limit})")
    else:
        checks.add_row("parity vs float64 oracle", f"{v.float64_rel_error:.2e} ({limit})")
        checks.add_row("parity vs float32 oracle", f"{v.parity_rel_error:.2e}")
        checks.add_row("PyTorch float32 vs float64", f"{v.source_float32_rel_error:.2e}")
    if v.reference_rel_error is not None:
        checks.add_row("reference.onnx vs oracle", f"{v.reference_rel_error:.2e}")
    checks.add_row(
        "batch independence",
        f"{v.batch_independence_rel_error:.2e}"
        + (" (bitwise)" if v.batch_independence_bitwise else ""),
    )
    checks.add_row("BatchNormalization nodes left", str(v.batch_norm_nodes_left))
    if v.source_model_untouched is not None:
        checks.add_row("source model untouched", "yes" if v.source_model_untouched else "NO")
    checks.add_row("written to", report.path)
    checks.add_row("took", f"{report.seconds:.1f} s")
    console.print(checks)
    if report.recalibration is not None:
        _recalibration(console, report)
    for warning in report.warnings:
        console.print(f"warning: {warning}", style="yellow")


def _recalibration(console: Console, report: ExportReport) -> None:
    r = report.recalibration
    c = r.capture
    table = Table(
        title=f"recalibrated from v{r.parent_version} ({r.method}) on capture {c.capture_id}: "
        f"{c.samples} samples, {c.started} .. {c.stopped or 'running'}",
        title_justify="left",
    )
    for column in ("layer", "values/channel", "mean shift (RMS, sigma)", "log var ratio (RMS)"):
        table.add_column(column)
    for layer in r.layers:
        count = "?" if layer.values_per_channel is None else str(layer.values_per_channel)
        table.add_row(layer.name, count, f"{layer.mean_shift:.3f}", f"{layer.log_var_ratio:.3f}")
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
