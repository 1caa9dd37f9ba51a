"""PyTorch module -> ONNX in eval mode with a dynamic batch axis, BatchNorm nodes intact.

torch.onnx's dynamo exporter with optimize=False keeps every BatchNormalization node (its
optimizer would fold only Conv+BN) and records each node's module path, which names the layers.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings

import onnx
import torch

from .errors import ExportError
from .fold import materialize_constants
from .onnx_io import make_batch_dynamic


def default_input_names(module: torch.nn.Module, count: int) -> list[str]:
    try:
        params = [
            p.name for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]  # fmt: skip
    except (TypeError, ValueError):
        params = []
    if len(params) >= count:
        return params[:count]
    return ["input"] if count == 1 else [f"input_{i}" for i in range(count)]


def default_output_names(count: int) -> list[str]:
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def to_onnx(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
) -> onnx.ModelProto:
    # torch.export specializes dimensions of size 1, which would pin the batch: trace with two.
    example = tuple(torch.cat([x, x]) if x.shape[0] == 1 else x for x in example)
    batch = torch.export.Dim("batch", min=1)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                example,
                dynamo=True,
                dynamic_shapes=tuple({0: batch} for _ in example),
                external_data=False,
                optimize=False,
                input_names=input_names,
                output_names=output_names,
                verbose=False,
            )
    except Exception as exc:
        raise ExportError(
            f"torch.onnx could not export the model: {_first_line(exc)}; expected a model "
            "torch.export can trace with a dynamic batch dimension"
        ) from exc
    # A valid reference: torch.onnx computes some biases (Conv3d's with a wrong shape).
    model = materialize_constants(program.model_proto)
    make_batch_dynamic(model)
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
