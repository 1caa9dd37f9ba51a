"""Errors the export stage reports to its caller: each message is one line saying what is wrong
and what was expected, so the CLI can print it as is."""


class ExportError(Exception):
    """Base class: the export failed and the repository was left untouched."""


class InvalidInputError(ExportError):
    """A model, checkpoint, factory, shape or option the caller gave is not usable."""


class UnsupportedGraphError(ExportError):
    """The ONNX graph has a construct the folder cannot remove exactly."""


class BatchStatisticsError(ExportError):
    """BatchNorm layers normalize with batch statistics: eval output would depend on the batch."""

    def __init__(self, message: str, layers: list[str]) -> None:
        super().__init__(message)
        self.layers = layers


class VerificationError(ExportError):
    """The exported graph missed a documented tolerance; the message carries the figures."""
