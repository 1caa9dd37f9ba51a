"""fold_onnx: an ONNX file from any producer -> a verified, BatchNorm-free repository entry.

The source graph, normalized (external data inlined, a dynamic batch axis, initializers no
longer listed as overridable inputs), becomes reference.onnx; the oracle is ONNX Runtime on it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from .card import ExportReport
from .errors import InvalidInputError, UnsupportedGraphError
from .fold import FoldedLayer
from .onnx_io import make_batch_dynamic
from .publish import Progress, publish, quiet

DEFAULT_BATCH = 4
DEFAULT_FREE_DIM = 32


def fold_onnx(
    source: str | os.PathLike | onnx.ModelProto,
    *,
    repository="models",
    name: str,
    version: int | None = None,
    input_shapes: list[tuple[int, ...]] | None = None,
    labels: list[str] | None = None,
    description: str | None = None,
    parity_tolerance: float | None = None,
    progress: Progress = quiet,
) -> ExportReport:
    """Fold every BatchNorm of an existing ONNX model and publish it with its reference graph.

    Verification feeds random inputs: the batch axis gets 4 samples, other unknown dimensions
    32, unless `input_shapes` (without the batch axis) says otherwise. parity_tolerance
    replaces the fixed parity limit (no float64 oracle for ONNX input: see export/verify.py).
    """
    started = time.perf_counter()
    progress("Reading the ONNX model")
    model = _load(source)
    reference = _normalize(model)
    inputs = _random_inputs(reference, input_shapes)

    def describe(layer: FoldedLayer) -> dict[str, Any]:
        return {
            "name": layer.layer,
            "onnx_node": layer.onnx_node,
            "channels": layer.channels,
            "eps": float(f"{layer.epsilon:.7g}"),
            "momentum": float(f"{layer.momentum:.7g}"),
            "statistics": "running",
            "removed_by": layer.method,
            "folded_into": layer.target,
            "note": layer.reason,
        }

    return publish(
        reference=reference,
        inputs=inputs,
        oracle_outputs=None,
        parity_tolerance=parity_tolerance,
        repository=repository,
        name=name,
        version=version,
        source="onnx",
        describe_layer=describe,
        labels=labels,
        description=description,
        started=started,
        progress=progress,
    )


def _load(source) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        return source
    path = Path(source)
    try:
        model = onnx.load(path)  # loads external data from beside the file
    except FileNotFoundError as exc:
        raise InvalidInputError(f"ONNX file {path} does not exist; expected a .onnx file") from exc
    except Exception as exc:
        raise InvalidInputError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}); expected a .onnx file "
            "with its external data, if any, beside it"
        ) from exc
    return model


def _normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise UnsupportedGraphError(
            f"the ONNX model does not pass onnx.checker: {str(exc).splitlines()[0][:200]}; "
            "expected a valid ONNX model"
        ) from exc
    if not model.graph.input or not model.graph.output:
        raise UnsupportedGraphError("the ONNX model has no inputs or outputs; expected both")
    # Old exporters list initializers as inputs too; serving treats weights as fixed.
    initializers = {t.name for t in model.graph.initializer}
    real_inputs = [i for i in model.graph.input if i.name not in initializers]
    del model.graph.input[:]
    model.graph.input.extend(real_inputs)
    for value in [*model.graph.input, *model.graph.output]:
        if not value.type.HasField("tensor_type") or not value.type.tensor_type.shape.dim:
            raise UnsupportedGraphError(
                f"graph input/output '{value.name}' has no tensor shape; expected tensors with a "
                "leading batch dimension"
            )
    make_batch_dynamic(model)
    if not model.producer_name:
        model.producer_name = "unknown"
    model.graph.doc_string = model.graph.doc_string or "reference graph for bnserve"
    helper.set_model_props(model, {"bnserve.role": "reference"})
    return model


def _random_inputs(model: onnx.ModelProto, shapes) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = []
    for index, value in enumerate(model.graph.input):
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        if shapes is not None:
            if index >= len(shapes) or len(shapes[index]) != len(dims) - 1:
                raise InvalidInputError(
                    f"input shape {shapes[index] if index < len(shapes) else None} for "
                    f"'{value.name}' does not fit its rank {len(dims)}; expected "
                    f"{len(dims) - 1} dimensions after the batch"
                )
            rest = list(shapes[index])
        else:
            rest = [d or DEFAULT_FREE_DIM for d in dims[1:]]
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        if dtype.kind != "f":
            raise UnsupportedGraphError(
                f"input '{value.name}' has dtype {dtype}; expected floating-point inputs to "
                "verify with random data"
            )
        arrays.append(rng.standard_normal((DEFAULT_BATCH, *rest)).astype(dtype))
    return arrays
