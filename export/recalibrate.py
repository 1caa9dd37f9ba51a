"""recalibrate: a repository version + captured traffic -> the next version, whose BatchNorm
statistics are the exact population statistics of that traffic (PreciseBN).

Two routes, one result:
  - default, no torch: through the source version's reference.onnx with ONNX Runtime
    (onnx_statistics.population_statistics), then folded and verified against the updated
    reference.onnx, as `fold_onnx` does;
  - with factory (+ weights): through PyTorch, `export_model(recalibrate=True)` on the capture.
Either way the new version carries the parent's labels, serving settings and samples, and its
card records where it came from (card.Recalibration).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import orjson

from .capture import Capture, read_capture
from .card import (
    CaptureRecord,
    ChannelStatistics,
    ExportReport,
    ModelCard,
    RecalibratedLayer,
    Recalibration,
)
from .errors import InvalidInputError
from .fold import FoldedLayer
from .onnx_statistics import LayerStatistics, population_statistics, read_statistics
from .publish import Progress, publish, quiet
from .repository import existing_versions

VERIFY_SAMPLES = 256
INLINE_CHANNELS = 4096  # per-channel before/after above this many channels go to a sidecar
STATISTICS_FILE = "recalibration.json"


def recalibrate(
    source: str | Path,
    calibration: str | Path,
    *,
    repository: str | Path | None = None,
    version: int | None = None,
    factory: str | None = None,
    weights: str | Path | None = None,
    progress: Progress = quiet,
) -> ExportReport:
    """Write a new version of the model at `source` (models/<name>/<version>) with statistics
    measured on the capture at `calibration`. The repository defaults to the source's; the
    version to the next free number."""
    started = time.perf_counter()
    source = Path(source)
    progress("Reading the source version and the capture")
    parent = _read_card(source)
    reference = _read_reference(source)
    repository = Path(repository) if repository is not None else source.parent.parent
    capture = read_capture(calibration)
    inputs = capture.inputs_for(parent.inputs)
    before = read_statistics(reference)
    if version is None:
        version = max(existing_versions(repository / parent.name), default=parent.version) + 1
    samples = _parent_samples(source, parent)
    description = (
        f"v{parent.version} recalibrated on capture {capture.manifest.capture_id} "
        f"({capture.samples} samples)" + (f"; {parent.description}" if parent.description else "")
    )
    warnings = []
    if capture.manifest.model != parent.name:
        warnings.append(
            f"the capture was recorded for model {capture.manifest.model!r}, not {parent.name!r}"
        )
    if capture.manifest.stopped is None:
        warnings.append("the capture was still running; its listed shards were used")
    common: dict[str, Any] = {
        "repository": repository,
        "name": parent.name,
        "version": version,
        "description": description,
        "serving": parent.serving,
        "progress": progress,
        "extra_files": samples,
    }
    labels = parent.outputs[0].labels
    if factory is not None or weights is not None:
        return _through_pytorch(
            parent,
            capture,
            inputs,
            before,
            factory=factory,
            weights=weights,
            labels=labels,
            common=common,
            warns=warnings,
        )

    progress("Recalibrating through reference.onnx with ONNX Runtime")
    updated, after = population_statistics(reference, inputs, progress)
    record, sidecars = _record(parent, capture, "onnxruntime", before, after)
    by_node = {layer.onnx_node: layer for layer in parent.batch_norm if layer.onnx_node}

    def describe(layer: FoldedLayer) -> dict[str, Any]:
        known = by_node.get(layer.onnx_node)
        info = known.model_dump() if known is not None else {}
        return info | {
            "name": info.get("name", layer.layer),
            "onnx_node": layer.onnx_node,
            "channels": layer.channels,
            "eps": info.get("eps", layer.epsilon),
            "momentum": info.get("momentum", layer.momentum),
            "statistics": "recalibrated",
            "removed_by": layer.method,
            "folded_into": layer.target,
            "note": layer.reason,
        }

    folded_nodes = {s.onnx_node for s in after}
    kept = [
        layer for layer in parent.batch_norm if layer.onnx_node not in folded_nodes
    ]  # per-sample normalization layers have no BN node: carried over as they were
    return publish(
        reference=updated,
        inputs=[x[:VERIFY_SAMPLES] for x in inputs],
        oracle_outputs=None,
        source=parent.source,
        describe_layer=describe,
        extra_layers=kept,
        layer_order=[layer.name.split("#")[0] for layer in parent.batch_norm],
        labels=labels,
        warnings=warnings,
        started=started,
        provenance=lambda _reference: (record, sidecars),
        **common,
    )


def _through_pytorch(parent, capture, inputs, before, *, factory, weights, labels, common, warns):
    try:
        import torch
    except ImportError as exc:
        raise InvalidInputError(
            f"--factory/--weights recalibrate through PyTorch, which cannot be imported here "
            f"({exc}); expected torch installed (pip install 'bnserve[export]'), or no "
            "--factory/--weights to recalibrate through reference.onnx without torch"
        ) from exc

    from .loading import load_model
    from .pytorch import export_model
    from .statistics import batch_norm_layers

    model = load_model(factory, Path(weights) if weights is not None else None)
    expected = list(dict.fromkeys(layer.name.split("#")[0] for layer in parent.batch_norm))
    found = list(batch_norm_layers(model))
    if found != expected:
        raise InvalidInputError(
            f"the model from {factory or weights} has BatchNorm layers {found[:8]}; expected "
            f"the source version's {expected[:8]} (the model it was exported from)"
        )
    tensors = tuple(torch.from_numpy(np.ascontiguousarray(x)) for x in inputs)

    def provenance(reference: onnx.ModelProto):
        after = read_statistics(reference)
        counts = _values_per_channel(reference, capture.samples)
        for stats in after:
            stats.count = counts.get(stats.onnx_node)
        return _record(parent, capture, "pytorch", before, after)

    report = export_model(
        model,
        tuple(t[:8] for t in tensors),
        calibration=tensors,
        recalibrate=True,
        labels=labels,
        input_names=[spec.name for spec in parent.inputs],
        output_names=[spec.name for spec in parent.outputs],
        provenance=provenance,
        **common,
    )
    return report.model_copy(update={"warnings": [*report.warnings, *warns]})


def _values_per_channel(reference: onnx.ModelProto, samples: int) -> dict[str, int | None]:
    """samples x the static positions per channel of each BN input (None where unknown)."""
    inferred = onnx.shape_inference.infer_shapes(reference)
    shapes = {
        v.name: [d.dim_value if d.HasField("dim_value") else None for d in _dims(v)]
        for v in [*inferred.graph.input, *inferred.graph.value_info]
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")
    }
    counts: dict[str, int | None] = {}
    for node in reference.graph.node:
        if node.op_type == "BatchNormalization":
            dims = shapes.get(node.input[0], [None])[2:]
            counts[node.name] = None if None in dims else samples * int(np.prod(dims, dtype=int))
    return counts


def _dims(value: onnx.ValueInfoProto):
    return value.type.tensor_type.shape.dim


def _record(
    parent: ModelCard,
    capture: Capture,
    method: str,
    before: list[LayerStatistics],
    after: list[LayerStatistics],
) -> tuple[Recalibration, dict[str, bytes]]:
    old = {s.layer: s for s in before}
    if sorted(old) != sorted(s.layer for s in after):  # names differ: pair in graph order
        old = {a.layer: b for a, b in zip(after, before, strict=False)}
    layers = []
    for new in after:
        prior = old.get(new.layer)
        if prior is None or prior.mean.shape != new.mean.shape:
            raise InvalidInputError(
                f"BatchNorm layer '{new.layer}' has no counterpart in the source version; "
                "expected the same layers as the version it was recalibrated from"
            )
        scale = np.sqrt(prior.var + prior.eps)
        layers.append(
            RecalibratedLayer(
                name=new.layer,
                onnx_node=new.onnx_node,
                channels=int(new.mean.size),
                values_per_channel=new.count,
                mean_shift=_rms((new.mean - prior.mean) / scale),
                log_var_ratio=_rms(np.log((new.var + new.eps) / (prior.var + prior.eps))),
                before=_channels(prior),
                after=_channels(new),
            )
        )
    manifest = capture.manifest
    record = Recalibration(
        parent_version=parent.version,
        method=method,
        capture=CaptureRecord(
            capture_id=manifest.capture_id,
            model=manifest.model,
            version=manifest.version,
            started=manifest.started,
            stopped=manifest.stopped,
            stop_reason=manifest.stop_reason,
            samples=manifest.samples,
        ),
        layers=layers,
    )
    if sum(layer.channels for layer in layers) <= INLINE_CHANNELS:
        return record, {}
    sidecar = orjson.dumps(
        [layer.model_dump(include={"name", "onnx_node", "before", "after"}) for layer in layers]
    )
    slim = [layer.model_copy(update={"before": None, "after": None}) for layer in layers]
    return record.model_copy(update={"layers": slim, "statistics_file": STATISTICS_FILE}), {
        STATISTICS_FILE: sidecar
    }


def _channels(stats: LayerStatistics) -> ChannelStatistics:
    return ChannelStatistics(mean=stats.mean.tolist(), var=stats.var.tolist())


def _rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(values)))) if values.size else 0.0


def _read_card(source: Path) -> ModelCard:
    path = source / "model.json"
    if not path.is_file():
        raise InvalidInputError(
            f"source version {source} has no model.json; expected a version folder "
            "models/<name>/<version> written by python -m export"
        )
    try:
        return ModelCard.model_validate_json(path.read_bytes())
    except Exception as exc:
        raise InvalidInputError(
            f"{path} is not a bnserve model card ({' '.join(str(exc).split())[:200]}); "
            "expected a model.json written by python -m export"
        ) from exc


def _read_reference(source: Path) -> onnx.ModelProto:
    path = source / "reference.onnx"
    if not path.is_file():
        raise InvalidInputError(
            f"source version {source} has no reference.onnx, so its BatchNorm layers cannot be "
            "measured; expected a version written by python -m export (reference.onnx keeps the "
            "BatchNormalization nodes)"
        )
    try:
        return onnx.load(path)
    except Exception as exc:
        raise InvalidInputError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}); expected the "
            "reference graph python -m export wrote"
        ) from exc


def _parent_samples(source: Path, parent: ModelCard) -> dict[str, bytes]:
    """The parent's demo batches, byte for byte, so the new version offers the same samples."""
    samples = {}
    for relative in parent.samples:
        path = source / relative
        if path.is_file() and path.resolve().is_relative_to(source.resolve()):
            samples[relative] = path.read_bytes()
    return samples
