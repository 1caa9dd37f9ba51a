"""Loading what the CLI is given: a factory plus weights, a torch.export .pt2, tensors."""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import numpy as np
import torch

from .errors import InvalidInputError


def load_model(factory: str | None, weights: Path | None) -> torch.nn.Module:
    if weights is not None and weights.suffix == ".pt2":
        return _load_exported_program(weights)
    if not factory:
        raise InvalidInputError(
            "no model given; expected --factory pkg.module:callable (with --weights for its "
            "state_dict) or --weights file.pt2"
        )
    model = _call_factory(factory)
    model.eval()  # built here for export, not a caller's model in training
    if weights is not None:
        state = _state_dict(weights)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())[:300]
            raise InvalidInputError(
                f"weights in {weights} do not fit the model built by {factory}: {detail}; "
                "expected the state_dict of that architecture"
            ) from exc
    return model


def load_tensor(path: Path) -> torch.Tensor:
    try:
        if path.suffix == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False))
        value = torch.load(path, weights_only=True, map_location="cpu")
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as exc:
        raise InvalidInputError(
            f"cannot read tensor file {path}: {_short(exc)}; expected a .npy array or a tensor "
            "saved with torch.save"
        ) from exc
    if not isinstance(value, torch.Tensor):
        raise InvalidInputError(f"{path} holds a {type(value).__name__}; expected one tensor")
    return value


def _call_factory(spec: str) -> torch.nn.Module:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InvalidInputError(f"factory {spec!r} is malformed; expected pkg.module:callable")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InvalidInputError(f"cannot import factory {spec!r}: {_short(exc)}") from exc
    try:
        model = target() if callable(target) else target
    except Exception as exc:
        raise InvalidInputError(
            f"factory {spec!r} raised {type(exc).__name__}: {_short(exc)}"
        ) from exc
    if not isinstance(model, torch.nn.Module):
        raise InvalidInputError(
            f"factory {spec!r} returned a {type(model).__name__}; expected a torch.nn.Module"
        )
    return model


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        value = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError as exc:
        raise InvalidInputError(f"weights file {path} does not exist") from exc
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):  # a real checkpoint holding Python objects
            raise InvalidInputError(
                f"{path} is not a weights-only checkpoint (it pickles Python objects, which "
                "torch.load(weights_only=True) refuses); expected a state_dict saved with "
                "torch.save(model.state_dict(), path)"
            ) from exc
        raise InvalidInputError(
            f"{path} is not a torch.save checkpoint ({_short(exc)}); expected a state_dict "
            "saved with torch.save(model.state_dict(), path)"
        ) from exc
    except Exception as exc:
        raise InvalidInputError(
            f"cannot read weights file {path}: {_short(exc)}; expected a state_dict saved with "
            "torch.save(model.state_dict(), path)"
        ) from exc
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(value, dict) and isinstance(value.get(key), dict):
            value = value[key]
            break
    if not isinstance(value, dict) or not all(isinstance(v, torch.Tensor) for v in value.values()):
        raise InvalidInputError(
            f"{path} holds a {type(value).__name__} that is not a state_dict; expected a mapping "
            "of parameter names to tensors"
        )
    return value


def _load_exported_program(path: Path) -> torch.nn.Module:
    try:
        program = torch.export.load(path)
    except Exception as exc:
        raise InvalidInputError(
            f"cannot read {path} as a torch.export program: {_short(exc)}; expected a file "
            "written by torch.export.save"
        ) from exc
    if _captured_in_train_mode(program):
        raise InvalidInputError(
            f"{path} was captured in train mode: its BatchNorm ops normalize with batch "
            "statistics and torch.export programs cannot be switched to eval; expected a "
            "program exported from model.eval()"
        )
    return program.module()


_TRAINING_BATCH_NORMS = {
    "aten.batch_norm.default": 5,  # index of the `training` argument
    "aten.native_batch_norm.default": 5,
    "aten._native_batch_norm_legit_functional.default": 5,
    "aten._native_batch_norm_legit.default": 5,
    "aten._native_batch_norm_legit.no_stats": 3,
}


def _captured_in_train_mode(program) -> bool:
    for node in program.graph.nodes:
        index = _TRAINING_BATCH_NORMS.get(str(node.target))
        training = index is not None and len(node.args) > index and node.args[index] is True
        if node.op == "call_function" and training:
            return True
    return False


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]
