"""The steps both export paths share: fold, verify, build the model card, write the version."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

import numpy as np
import onnx
import orjson

from .card import (
    AffineFoldRecord,
    BatchNormLayer,
    ConstantFoldRecord,
    ExportReport,
    ExportTimings,
    ModelCard,
    Recalibration,
)
from .errors import InvalidInputError
from .fold import FoldedLayer, fold_batch_norms
from .onnx_io import tensor_specs
from .repository import file_record, write_version
from .verify import verify_export

Progress = Callable[[str], None]
# Given the reference graph being published: the card's recalibration record and any sidecar
# files it needs (export/recalibrate.py).
Provenance = Callable[[onnx.ModelProto], tuple[Recalibration, dict[str, bytes]]]


def quiet(_step: str) -> None:
    pass


def producer_versions(**extra: str) -> dict[str, str]:
    versions = {}
    for package in ("bnserve", "onnx", "onnxruntime-gpu", "torch", "onnxscript"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions | extra


def publish(
    *,
    reference: onnx.ModelProto,
    inputs: list[np.ndarray],
    oracle_outputs: list[np.ndarray] | None,
    float64_outputs: list[np.ndarray] | None = None,
    parity_tolerance: float | None = None,
    timings: ExportTimings | None = None,
    repository,
    name: str,
    version: int | None,
    source: str,
    describe_layer: Callable[[FoldedLayer], dict[str, Any]],
    extra_layers: Sequence[BatchNormLayer] = (),
    layer_order: Sequence[str] = (),
    source_untouched: bool | None = None,
    labels: list[str] | None = None,
    samples: Mapping[str, list[np.ndarray]] | None = None,
    serving: dict | None = None,
    description: str | None = None,
    warnings: Sequence[str] = (),
    started: float,
    progress: Progress = quiet,
    provenance: Provenance | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> ExportReport:
    timings = timings or ExportTimings()
    progress("Folding BatchNorm layers")
    clock = time.perf_counter()
    folded = fold_batch_norms(reference)
    timings.fold = _since(clock)
    progress("Verifying against the oracle")
    clock = time.perf_counter()
    verification = verify_export(
        folded.model,
        reference,
        inputs,
        oracle_outputs,
        float64_outputs=float64_outputs,
        parity_tolerance=parity_tolerance,
    )
    timings.verify = _since(clock)
    verification.source_model_untouched = source_untouched
    layers = [BatchNormLayer(**describe_layer(layer)) for layer in folded.layers]
    layers.extend(extra_layers)
    rank = {name: i for i, name in enumerate(layer_order)}
    layers.sort(key=lambda layer: rank.get(layer.name.split("#")[0], len(rank)))  # stable
    inputs_spec, outputs_spec = (
        tensor_specs(reference.graph.input),
        tensor_specs(reference.graph.output),
    )
    if labels is not None:
        classes = outputs_spec[0].shape[-1] if outputs_spec[0].shape else -1
        if len(labels) != classes:
            raise InvalidInputError(
                f"{len(labels)} labels given for output '{outputs_spec[0].name}' with {classes} "
                "classes on its last axis; expected one label per class"
            )
        outputs_spec[0].labels = list(labels)
    files = {
        "model.onnx": folded.model.SerializeToString(),
        "reference.onnx": reference.SerializeToString(),
    }
    for key, arrays in (samples or {}).items():
        files[f"samples/{key}.json"] = _sample_request(inputs_spec, arrays)
    files.update(extra_files or {})
    recalibration = None
    if provenance is not None:
        recalibration, sidecars = provenance(reference)
        files.update(sidecars)
    opset = next((o.version for o in reference.opset_import if o.domain in ("", "ai.onnx")), 0)

    def make_card(chosen: int) -> ModelCard:
        return ModelCard(
            name=name,
            version=chosen,
            created=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            description=description,
            source=source,
            producer=producer_versions(),
            opset=opset,
            inputs=inputs_spec,
            outputs=outputs_spec,
            batch_norm=layers,
            affine_folds=[AffineFoldRecord(**vars(f)) for f in folded.affine_folds],
            constant_folds=[ConstantFoldRecord(**vars(f)) for f in folded.constant_folds],
            verification=verification,
            files={k: file_record(v) for k, v in files.items() if not k.startswith("samples/")},
            samples=sorted(k for k in files if k.startswith("samples/")),
            serving=serving,
            recalibration=recalibration,
        )

    progress("Writing to the model repository")
    clock = time.perf_counter()
    _chosen, path = write_version(repository, name, version, files, make_card)
    timings.write = _since(clock)
    card = ModelCard.model_validate_json((path / "model.json").read_bytes())
    return ExportReport(
        **card.model_dump(),
        path=str(path),
        warnings=list(warnings),
        seconds=round(time.perf_counter() - started, 3),
        timings=timings,
    )


def _since(clock: float) -> float:
    return round(time.perf_counter() - clock, 3)


def _sample_request(specs, arrays: list[np.ndarray]) -> bytes:
    """A v2 inference request body that sends `arrays` to the model's inputs."""
    if len(arrays) != len(specs):
        raise InvalidInputError(f"sample has {len(arrays)} input(s); expected {len(specs)}")
    body = {
        "inputs": [
            {
                "name": spec.name,
                "shape": list(array.shape),
                "datatype": spec.datatype,
                "data": np.asarray(array).reshape(-1).tolist(),
            }
            for spec, array in zip(specs, arrays, strict=True)
        ]
    }
    return orjson.dumps(body)
