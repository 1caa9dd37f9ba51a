"""export_model: a trained PyTorch module -> a verified, BatchNorm-free entry in the repository.

The caller's module is never run, moved or modified: all work happens on a deep copy in eval
mode (and a float64 copy of that copy for the conditioning-aware oracle, see export/verify.py),
and the caller's training flags and state_dict are compared bit for bit at the end.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from torch.utils import _pytree

from .card import BatchNormLayer, ExportReport, ExportTimings
from .errors import BatchStatisticsError, InvalidInputError
from .fold import FoldedLayer
from .publish import Progress, Provenance, publish, quiet
from .statistics import (
    as_batches,
    batch_norm_layers,
    set_population_statistics,
    untracked_layers,
    use_per_sample_statistics,
)
from .torch_onnx import default_input_names, default_output_names, to_onnx
from .verify import FLOAT64_SAMPLES, check_parity_tolerance

BatchStats = Literal["error", "instance", "calibrate"]
VERIFY_SAMPLES = 256


def export_model(
    model: torch.nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    repository="models",
    name: str,
    version: int | None = None,
    batch_stats: BatchStats = "error",
    calibration: Any = None,
    recalibrate: bool = False,
    labels: list[str] | None = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    samples: Mapping[str, Any] | None = None,
    serving: dict | None = None,
    description: str | None = None,
    parity_tolerance: float | None = None,
    progress: Progress = quiet,
    provenance: Provenance | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> ExportReport:
    """Export `model` in eval mode with every BatchNorm folded, verified, into the repository.

    batch_stats decides what happens to layers with track_running_stats=False: "error" stops
    and names them, "instance" normalizes each sample with its own statistics, "calibrate"
    gives them exact population statistics from `calibration`. recalibrate=True recomputes
    every layer's statistics from `calibration` (PreciseBN). See export/statistics.py.
    provenance and extra_files are for `recalibrate` (export/recalibrate.py): the card's
    recalibration record and files copied into the version as they are.
    parity_tolerance replaces the conditioning-aware parity limit (export/verify.py).
    """
    started = time.perf_counter()
    timings = ExportTimings()
    parity_tolerance = check_parity_tolerance(parity_tolerance)
    if not isinstance(model, torch.nn.Module):
        raise InvalidInputError(f"model is a {type(model).__name__}; expected a torch.nn.Module")
    if batch_stats not in ("error", "instance", "calibrate"):
        raise InvalidInputError(
            f"batch_stats={batch_stats!r}; expected 'error', 'instance' or 'calibrate'"
        )
    example = _as_inputs(example_input)
    snapshot = _snapshot(model)
    notes: list[str] = []
    if model.training:
        notes.append(
            "the model came in train mode; it was exported in eval mode (running statistics), "
            "and the caller's model was left in train mode"
        )
        warnings.warn(notes[-1], stacklevel=2)

    progress("Preparing an eval-mode copy")
    work = _eval_copy(model)
    originals = {name: _describe_module(m) for name, m in batch_norm_layers(work).items()}
    untracked = untracked_layers(work)
    batches = as_batches(calibration, len(example))
    statistics = dict.fromkeys(originals, "running")
    if untracked and batch_stats == "error" and not recalibrate:
        raise BatchStatisticsError(
            f"BatchNorm layer(s) {', '.join(untracked)} have track_running_stats=False, so even "
            "in eval mode they normalize with the statistics of whatever batch they get; "
            "expected batch_stats='instance' (per-sample statistics, as train mode at batch "
            "size 1) or batch_stats='calibrate' with calibration data",
            untracked,
        )
    if ((batch_stats == "calibrate" and untracked) or recalibrate) and not batches:
        raise InvalidInputError(
            "calibration data is required for batch_stats='calibrate' and recalibrate=True; "
            "expected a tensor (or tuple of tensors, or iterable of batches) of inputs"
        )
    per_sample = untracked if batch_stats == "instance" else []
    use_per_sample_statistics(work, per_sample)
    statistics.update(dict.fromkeys(per_sample, "instance"))
    if recalibrate:
        progress("Recalibrating BatchNorm statistics (exact population statistics)")
        measured = [n for n in batch_norm_layers(work) if n not in per_sample]
        set_population_statistics(work, measured, batches)
        statistics.update({n: "calibrated" if n in untracked else "recalibrated" for n in measured})
    elif untracked and batch_stats == "calibrate":
        progress("Calibrating layers without running statistics")
        set_population_statistics(work, untracked, batches)
        statistics.update(dict.fromkeys(untracked, "calibrated"))

    progress("Running the PyTorch eval oracle (float32 and float64)")
    clock = time.perf_counter()
    verify_inputs = _verification_inputs(example, batches)
    oracle = _forward(work, verify_inputs, example)
    oracle64 = _float64_oracle(work, verify_inputs, oracle, notes)
    timings.oracle = _since(clock)
    input_names = input_names or default_input_names(work, len(example))
    output_names = output_names or default_output_names(len(oracle))

    progress("Exporting to ONNX (torch.onnx, dynamic batch)")
    clock = time.perf_counter()
    reference = to_onnx(work, example, input_names, output_names)
    timings.torch_export = _since(clock)
    untouched = _same_state(model, snapshot)
    if not untouched:  # the copy shares nothing with the caller; this guards that promise
        raise InvalidInputError("the caller's model changed during export; refusing to publish")

    def describe(layer: FoldedLayer) -> dict[str, Any]:
        module_name = layer.layer.split("#")[0]
        info = dict(originals.get(module_name, {}))
        info.pop("channels", None)
        return {
            "name": layer.layer,
            "onnx_node": layer.onnx_node,
            "channels": layer.channels,
            "eps": info.pop("eps", layer.epsilon),
            "momentum": info.pop("momentum", layer.momentum),
            **info,
            "statistics": statistics.get(module_name, "running"),
            "removed_by": layer.method,
            "folded_into": layer.target,
            "note": layer.reason,
        }

    extra = [
        BatchNormLayer(
            name=name,
            onnx_node="",
            channels=originals[name]["channels"],
            eps=originals[name]["eps"],
            momentum=originals[name]["momentum"],
            num_batches_tracked=originals[name]["num_batches_tracked"],
            track_running_stats=False,
            affine=originals[name]["affine"],
            statistics="instance",
            removed_by="per_sample_normalization",
            note="track_running_stats=False: normalized with each sample's own statistics "
            "(ReduceMean over spatial axes), not foldable",
        )
        for name in per_sample
    ]
    return publish(
        reference=reference,
        inputs=[x.numpy() for x in verify_inputs],
        oracle_outputs=oracle,
        float64_outputs=oracle64,
        parity_tolerance=parity_tolerance,
        timings=timings,
        repository=repository,
        name=name,
        version=version,
        source="pytorch",
        describe_layer=describe,
        extra_layers=extra,
        layer_order=list(originals),
        source_untouched=untouched,
        labels=labels,
        samples={k: [np.asarray(t) for t in _as_inputs(v)] for k, v in (samples or {}).items()},
        serving=serving,
        description=description,
        warnings=notes,
        started=started,
        progress=progress,
        provenance=provenance,
        extra_files=extra_files,
    )


def _eval_copy(model: torch.nn.Module) -> torch.nn.Module:
    work = copy.deepcopy(model)
    # torch.export modules fix train/eval at capture (loading refuses train-mode captures).
    with contextlib.suppress(NotImplementedError):
        work.eval()
    return work


def _as_inputs(example) -> tuple[torch.Tensor, ...]:
    items = (example,) if isinstance(example, torch.Tensor | np.ndarray) else tuple(example)
    tensors = tuple(torch.as_tensor(x) for x in items)
    if not tensors or any(t.dim() < 1 or t.shape[0] < 1 for t in tensors):
        raise InvalidInputError(
            "example input has no batch dimension; expected tensors shaped (batch, ...)"
        )
    if len({t.shape[0] for t in tensors}) != 1:
        raise InvalidInputError(
            f"example inputs have batch sizes {[t.shape[0] for t in tensors]}; expected one "
            "batch size shared by all inputs"
        )
    return tensors


def _describe_module(bn) -> dict[str, Any]:
    return {
        "channels": bn.num_features,
        "eps": float(bn.eps),
        "momentum": None if bn.momentum is None else float(bn.momentum),
        "num_batches_tracked": None
        if bn.num_batches_tracked is None
        else int(bn.num_batches_tracked),
        "track_running_stats": bool(bn.track_running_stats),
        "affine": bool(bn.affine),
    }


def _verification_inputs(example, batches) -> tuple[torch.Tensor, ...]:
    """The example then calibration samples, in the example's dtypes (float64 models too)."""
    parts = [example, *batches]
    joined = [torch.cat([p[i].to(example[i].dtype) for p in parts]) for i in range(len(example))]
    return tuple(t[:VERIFY_SAMPLES].detach().contiguous() for t in joined)


def _forward(work, inputs, example) -> list[np.ndarray]:
    """The oracle: the eval-mode copy's outputs, chunked like the verification runs."""
    try:
        return _run(work, inputs)
    except InvalidInputError:
        raise
    except Exception as exc:
        shapes = ", ".join(str(tuple(x.shape)) for x in example)
        raise InvalidInputError(
            f"example input of shape {shapes} does not fit the model: "
            f"{str(exc).strip().splitlines()[0][:200]}; expected the shape the model's forward "
            "takes, with a leading batch dimension"
        ) from exc


def _run(work, inputs) -> list[np.ndarray]:
    outputs: list[list[np.ndarray]] = []
    with torch.no_grad():
        for i in range(0, inputs[0].shape[0], 64):
            result = work(*(x[i : i + 64] for x in inputs))
            flat = _pytree.tree_flatten(result)[0]
            outputs.append([t.detach().cpu().numpy() for t in flat])
    return [np.concatenate(parts) for parts in zip(*outputs, strict=True)]


def _float64_oracle(work, inputs, oracle, notes: list[str]) -> list[np.ndarray] | None:
    """The eval copy's outputs on the first FLOAT64_SAMPLES inputs, computed in float64 by a
    float64 copy of the copy (float64 convolutions are slow; export/verify.py says why enough).

    None (with a note) where it cannot be computed: outputs already float64 need no better
    oracle, and a model may fix float32 inside its forward (a torch.export program, a tensor
    created with dtype=float32), which float64 inputs cannot change.
    """
    if not all(o.dtype in (np.float32, np.float16) for o in oracle) or not all(
        x.is_floating_point() for x in inputs
    ):
        return None
    try:
        wide = tuple(x[:FLOAT64_SAMPLES].double() for x in inputs)
        outputs = _run(copy.deepcopy(work).double(), wide)
    except Exception as exc:
        notes.append(
            "no float64 oracle (the model does not run in float64: "
            f"{_first_line(exc)}); parity was held to the fixed float32 limit"
        )
        return None
    if [o.shape for o in outputs] != [o[:FLOAT64_SAMPLES].shape for o in oracle] or not all(
        o.dtype == np.float64 for o in outputs
    ):
        notes.append(
            "no float64 oracle (the model's float64 copy does not return float64 outputs of "
            "the same shapes); parity was held to the fixed float32 limit"
        )
        return None
    return outputs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def _since(clock: float) -> float:
    return round(time.perf_counter() - clock, 3)


def _snapshot(model: torch.nn.Module):
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    flags = [(name, m.training) for name, m in model.named_modules()]
    return state, flags


def _same_state(model: torch.nn.Module, snapshot) -> bool:
    state, flags = snapshot
    if flags != [(name, m.training) for name, m in model.named_modules()]:
        return False
    now = model.state_dict(keep_vars=True)
    if now.keys() != state.keys():
        return False
    return all(_bitwise_equal(now[k].detach(), state[k]) for k in state)


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
    if a.is_floating_point() or a.is_complex():
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)
