"""The data plane one app instance serves, reached by the REST routers as a dependency."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .dataplane.plane import DataPlane

# The routers' historic name for the data plane.
Services = DataPlane


async def services(request: Request) -> DataPlane:
    # async: FastAPI would run a plain function dependency on a worker thread per request
    return request.app.state.services


ServicesDep = Annotated[DataPlane, Depends(services)]
