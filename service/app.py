"""The FastAPI application: wiring of settings, registry, services, routers and error bodies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from . import __version__
from .batching import BatchingConfig
from .config import Settings
from .drift.service import DriftService, attach_analyzer
from .errors import ServiceError
from .inference import InferenceService
from .live_hooks import close_live, live_hooks
from .metrics import Metrics
from .middleware import RequestContextMiddleware
from .model import ServingOptions
from .protocol.schemas import ErrorResponse, InferenceRequest
from .registry import ModelRegistry
from .repository import ModelRepository, VersionPolicy
from .routers import capture, drift, health, infer, live_drift, metrics, models, repository
from .runtime import SessionFactory
from .state import Services

log = logging.getLogger("bnserve.app")


def build_services(settings: Settings) -> Services:
    metrics_ = Metrics()
    factory = SessionFactory(settings.providers, settings.device_id, settings.intra_op_threads)
    batching = BatchingConfig(
        max_batch_size=settings.max_batch_size,
        max_queue_delay_us=settings.max_queue_delay_us,
        max_queue_size=settings.max_queue_size,
        workers=settings.inference_threads,
    )
    on_load = [attach_analyzer(factory)] if settings.debug_endpoints else []
    live_load, live_extra = live_hooks(settings, factory, metrics_)  # live drift + capture
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
    return Services(
        settings=settings,
        metrics=metrics_,
        registry=registry,
        inference=inference,
        drift=drift,
        extra=live_extra,
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    s = build_services(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load in the background: /v2/health/live answers at once, ready turns true after.
        loader = asyncio.create_task(_start(s))
        poller = asyncio.create_task(_poll(s)) if settings.poll_interval > 0 else None
        try:
            yield
        finally:
            s.draining = True
            for task in (loader, poller):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await s.registry.close()
            close_live(s)

    app = FastAPI(
        title="bnserve",
        version=__version__,
        description="KServe v2 inference over ONNX Runtime for models whose BatchNorm layers "
        "were folded exactly at export, with a BatchNorm stat-drift debug endpoint.",
        lifespan=lifespan,
    )
    app.state.services = s
    for module in (health, models, infer, drift, live_drift, repository, capture, metrics):
        app.include_router(module.router)
    _install_error_handlers(app)
    app.openapi = lambda: _openapi(app)
    app.add_middleware(
        RequestContextMiddleware,
        max_body=settings.max_request_bytes,
        metrics=s.metrics,
        known_model=s.registry.knows,
        shed=s.inference.shed,
    )
    return app


async def _start(s: Services) -> None:
    try:
        await s.registry.load_all()
    except Exception:
        log.exception("loading the model repository failed")
    s.started = True
    log.info("ready: %d model(s) loaded", len(s.registry.loaded_models()))


async def _poll(s: Services) -> None:
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
        for path, operations in schema["paths"].items():
            for method, operation in operations.items():
                _document_errors(path, method, operation["responses"])
        app.openapi_schema = schema
    return app.openapi_schema


ERROR_DESCRIPTIONS = {
    "400": "the request does not fit the API or the model",
    "401": "missing or wrong bearer token (when a token is configured)",
    "404": "unknown model, version or endpoint",
    "413": "body over BNSERVE_MAX_REQUEST_BYTES",
    "503": "not ready or overloaded (Retry-After)",
}


def _document_errors(path: str, method: str, responses: dict) -> None:
    """Every error an operation can answer, all with the v2 error body. FastAPI would list
    422 for validation errors; this service answers those with 400."""
    codes = set()
    if responses.pop("422", None) is not None or method == "post":
        codes.add("400")
    if method == "post":
        codes.add("413")
    if "{model_name}" in path:
        codes |= {"404", "503"}
    if path.startswith("/v2/repository") or "stat-drift" in path:
        codes |= {"401", "404"}
    body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for code in sorted(codes):
        responses.setdefault(code, {"description": ERROR_DESCRIPTIONS[code], "content": body})
