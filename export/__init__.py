"""bnserve export: PyTorch or ONNX models -> eval-mode ONNX with every BatchNorm folded away,
verified, and written as a versioned entry of the model repository.

`export_model` needs torch; `fold_onnx`, `recalibrate` (without a factory) and the fold passes do
not, so torch is imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .card import BatchNormLayer, ExportReport, ModelCard, Verification
from .errors import (
    BatchStatisticsError,
    ExportError,
    InvalidInputError,
    UnsupportedGraphError,
    VerificationError,
)
from .onnx_source import fold_onnx
from .recalibrate import recalibrate

if TYPE_CHECKING:
    from .pytorch import export_model

__all__ = [
    "BatchNormLayer",
    "BatchStatisticsError",
    "ExportError",
    "ExportReport",
    "InvalidInputError",
    "ModelCard",
    "UnsupportedGraphError",
    "Verification",
    "VerificationError",
    "export_model",
    "fold_onnx",
    "recalibrate",
]


def __getattr__(name: str):
    if name == "export_model":
        from .pytorch import export_model

        return export_model
    raise AttributeError(name)
