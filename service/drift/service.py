"""Stat-drift as a plain class: the data plane's typed request in, a StatDriftResponse out."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import numpy as np

from ..config import Settings
from ..errors import BadRequest, NotFound
from ..model import LoadedModel
from ..protocol.datatypes import NUMPY_TO_V2
from ..registry import ModelRegistry
from ..runtime import SessionFactory
from .analysis import DriftAnalyzer, Thresholds, summarize
from .graph import DriftGraph, DriftGraphError
from .schemas import StatDriftResponse

if TYPE_CHECKING:
    from ..dataplane.inference import InferenceService
    from ..dataplane.types import InferRequest

log = logging.getLogger("bnserve.drift")


def attach_analyzer(factory: SessionFactory):
    """A registry load hook that builds each version's drift analyzer next to its session."""

    def attach(model: LoadedModel) -> None:
        try:
            model.drift = DriftAnalyzer(model.files, factory)
        except (DriftGraphError, OSError, RuntimeError, ValueError) as exc:
            model.drift_error = str(exc)
            log.warning("stat-drift unavailable for %s v%s: %s", model.name, model.version, exc)

    return attach


class DriftService:
    def __init__(self, registry: ModelRegistry, inference: InferenceService, settings: Settings):
        self.registry = registry
        self.inference = inference
        self.settings = settings
        self.thresholds = Thresholds(warn=settings.drift_warn, drift=settings.drift_alert)

    def analyzer(self, model: LoadedModel) -> DriftAnalyzer:
        analyzer = model.drift
        if analyzer is None:
            reason = model.drift_error or "not built"
            raise NotFound(f"stat-drift is not available for model '{model.name}': {reason}")
        return analyzer

    async def analyze(self, request: InferRequest) -> StatDriftResponse:
        model = self.registry.get(request.model_name, request.model_version)
        analyzer = self.analyzer(model)
        with model.use():
            decoded = self.inference.validate(model, request)
            parameters = request.parameters
            flags = {k: parameters.get(k, False) for k in ("return_outputs", "return_statistics")}
            for key, value in flags.items():
                if not isinstance(value, bool):
                    raise BadRequest(f"parameter {key} is {value!r}; expected true or false")
            analyzer.check_batch(decoded.batch_size)
            loop = asyncio.get_running_loop()
            with self.inference.admitted(model):
                # On the model's own thread: analysis and serving take turns, never compete.
                work = loop.run_in_executor(model.executor, analyzer.run, decoded.tensors)
                taps = await self.inference.within_timeout(model, work, "stat-drift")
            layers = analyzer.layers(taps, self.thresholds, flags["return_statistics"])
            outputs = analyzer.outputs(taps)
            response = StatDriftResponse(
                model_name=model.name,
                model_version=str(model.version),
                id=decoded.request.id,
                batch_size=decoded.batch_size,
                summary=summarize(layers, outputs, self.thresholds),
                outputs=outputs,
                layers=layers,
            )
            if flags["return_outputs"]:
                response.global_outputs = [_tensor(n, taps[n]) for n in analyzer.graph.outputs]
                response.batch_outputs = [
                    _tensor(n, taps[DriftGraph.batch_name(n)]) for n in analyzer.graph.outputs
                ]
            return response


def _tensor(name: str, array: np.ndarray) -> dict:
    return {
        "name": name,
        "datatype": NUMPY_TO_V2[array.dtype],
        "shape": list(array.shape),
        "data": array.reshape(-1).tolist(),
    }
