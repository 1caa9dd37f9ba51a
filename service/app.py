"""The FastAPI application: the data plane, the REST routers over it, error bodies, and the
gRPC server beside it (same process, same event loop) when asked for."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from . import __version__
from .batching import BatchingConfig
from .config import Settings
from .dataplane.inference import InferenceService
from .dataplane.plane import DataPlane
from .drift.service import DriftService, attach_analyzer
from .errors import ServiceError
from .live_hooks import close_live, live_hooks
from .metrics import Metrics
from .middleware import RequestContextMiddleware
from .model import ServingOptions
from .protocol.http1 import InferOnWire
from .protocol.schemas import ErrorResponse, InferenceRequest
from .registry import ModelRegistry
from .repository import ModelRepository, VersionPolicy
from .routers import (
    capture,
    drift,
    health,
    infer,
    live_drift,
    metrics,
    models,
    repository,
    statistics,
)
from .routers.responses import DESCRIPTIONS, ERROR_BODY
from .runtime import SessionFactory

log = logging.getLogger("bnserve.app")


class BnserveApp(FastAPI):
    """FastAPI behind the request middleware: every HTTP request meets the middleware first
    (request id, body limit, early refusal, metrics, access log, and the infer endpoint), and
    only the rest go on through FastAPI's own stack (its per-request telemetry check, error
    and exception middleware, routing), which alone costs more than a small model's run."""

    front: Callable[[dict, Callable, Callable], Awaitable[None]]
    wire: InferOnWire | None = None  # infer requests the HTTP protocol answers itself

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            await self.front(scope, receive, send)
        else:  # lifespan
            await super().__call__(scope, receive, send)


def build_services(settings: Settings) -> DataPlane:
    metrics_ = Metrics()
    factory = SessionFactory(settings.providers, settings.device_id, settings.intra_op_threads)
    batching = BatchingConfig(
        max_batch_size=settings.max_batch_size,
        max_queue_delay_us=settings.max_queue_delay_us,
        max_queue_size=settings.max_queue_size,
        workers=settings.inference_threads,
        inline_run_us=settings.inline_run_us,
    )
    on_load = [attach_analyzer(factory)] if settings.debug_endpoints else []
    live_load, capture = live_hooks(settings, factory, metrics_)  # live drift + capture
    on_load += live_load
    registry = ModelRegistry(
        ModelRepository(settings.repository),
        ServingOptions(factory, metrics_, batching),
        VersionPolicy(settings.version_policy),
        on_load=on_load,
        on_state=metrics_.set_model_state,
    )
    inference = InferenceService(registry, settings, metrics_)
    drift = DriftService(registry, inference, settings) if settings.debug_endpoints else None
    return DataPlane(settings, metrics_, registry, inference, drift, capture=capture)


def create_app(
    settings: Settings | None = None, *, grpc: bool = False, fast_infer: bool = True
) -> FastAPI:
    """The REST app; with grpc=True its lifespan also runs the gRPC server on
    settings.grpc_port (python -m service does; in-process test clients do not). fast_infer
    False sends infer requests through FastAPI's routes (tests compare the two)."""
    settings = settings or Settings()
    s = build_services(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        grpc_server = None
        if grpc and settings.grpc_port:
            from .protocol.grpc.server import GrpcServer

            grpc_server = GrpcServer(s)
            await grpc_server.start()
            app.state.grpc = grpc_server
        # Load in the background: /v2/health/live answers at once, ready turns true after.
        loader = asyncio.create_task(_start(s))
        poller = asyncio.create_task(_poll(s)) if settings.poll_interval > 0 else None
        try:
            yield
        finally:
            s.draining = True
            if grpc_server is not None:  # in-flight calls finish within the grace period
                await grpc_server.stop(settings.graceful_timeout)
            for task in (loader, poller):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await s.registry.close()
            close_live(s)

    app = BnserveApp(
        title="bnserve",
        version=__version__,
        description="KServe v2 inference over ONNX Runtime for models whose BatchNorm layers "
        "were folded exactly at export, with a BatchNorm stat-drift debug endpoint.",
        lifespan=lifespan,
    )
    app.state.services = s
    for module in (
        health,
        statistics,
        models,
        infer,
        drift,
        live_drift,
        repository,
        capture,
        metrics,
    ):
        app.include_router(module.router)
    _install_error_handlers(app)
    app.openapi = lambda: _openapi(app)
    app.front = RequestContextMiddleware(
        functools.partial(FastAPI.__call__, app),
        max_body=settings.max_request_bytes,
        observer=s.observer,
        refusal=s.refusal,
        infer=infer.InferRoute(s) if fast_infer else None,
        infer_templates=infer.InferRoute.templates,
    )
    if fast_infer and settings.http_fast_infer:
        app.wire = InferOnWire(s, settings.max_request_bytes)
    return app


async def _start(s: DataPlane) -> None:
    try:
        await s.registry.load_all()
    except Exception:
        log.exception("loading the model repository failed")
    s.started = True
    log.info("ready: %d model(s) loaded", len(s.registry.loaded_models()))


async def _poll(s: DataPlane) -> None:
    while True:
        await asyncio.sleep(s.settings.poll_interval)
        try:
            changed = await s.registry.poll()
        except Exception:
            log.exception("repository poll failed")
            continue
        if changed:
            log.info("repository poll reloaded %s", changed)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_request: Request, exc: ServiceError):
        return JSONResponse({"error": exc.message}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3]
        )
        return JSONResponse({"error": f"invalid request: {problems}"}, 400)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = "no such endpoint; expected a KServe v2 path such as /v2/models/{name}/infer"
        elif exc.status_code == 405:
            message = f"method not allowed on this path ({message})"
        return JSONResponse({"error": message}, exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, 500)


def _openapi(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        defs = InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(defs.pop("$defs", {}))
        components["InferenceRequest"] = defs
        components["ErrorResponse"] = ErrorResponse.model_json_schema()
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        for operations in schema["paths"].values():
            for operation in operations.values():
                # FastAPI documents 422 for parameter validation; this service answers 400.
                validation = operation["responses"].pop("422", None)
                if validation is not None and "400" not in operation["responses"]:
                    operation["responses"]["400"] = {
                        "description": DESCRIPTIONS[400],
                        "content": copy.deepcopy(ERROR_BODY),
                    }
        app.openapi_schema = schema
    return app.openapi_schema
