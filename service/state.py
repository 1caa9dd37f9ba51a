"""The objects one app instance is made of, built once and shared by the routers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from .config import Settings
from .drift.service import DriftService
from .inference import InferenceService
from .metrics import Metrics
from .registry import ModelRegistry


@dataclass
class Services:
    settings: Settings
    metrics: Metrics
    registry: ModelRegistry
    inference: InferenceService
    drift: DriftService | None = None  # when debug endpoints are on
    started: bool = False  # first repository load finished
    draining: bool = False  # shutting down: not ready, finishing what is in flight
    extra: dict = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.started and not self.draining


async def services(request: Request) -> Services:
    # async: FastAPI would run a plain function dependency on a worker thread per request
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(services)]
