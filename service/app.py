"""The app factory. Nothing happens at import time: settings, engine and worker are built in the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__
from service.api import catalog, health, ui, workers
from service.api import metrics as metrics_api
from service.api.cached_reads import CachedAnswers
from service.api.deps import require_api_key, require_page_access
from service.artifacts import routes as artifacts
from service.config import Settings
from service.db import migrate
from service.db.session import make_engine, make_session_factories, session_scope
from service.errors import UnexpectedErrors, error_responses, install_error_handlers
from service.observability import Metrics, RequestContext
from service.recommendations import routes as recommendations
from service.security import UNSAFE_METHODS, CrossSiteGuard
from service.state import AppState, detect_host
from service.worker import Worker

log = logging.getLogger(__name__)

# Room for the multipart framing and form fields around an upload of max_upload_bytes.
UPLOAD_FORM_OVERHEAD = 64 * 1024

DESCRIPTION = """
Tells a training pipeline which batch size to use. POST a model, dataset size, memory budget and
device; the service runs short real probe trainings on its host device and answers with the largest
batch size that fits (verified by a real training step) and a training recipe.

Start with `POST /v1/recommendations` and poll `GET /v1/recommendations/{id}`.
"""


def create_app(settings: Settings | None = None, *, run_worker: bool | None = None) -> FastAPI:
    resolved = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        url = resolved.resolved_database_url
        engine = make_engine(resolved)  # creates the SQLite file's folder
        migrate.upgrade(url)
        reads, writes = make_session_factories(engine)
        state = AppState(
            settings=resolved, engine=engine, reads=reads, writes=writes, host=detect_host(resolved)
        )
        metrics.watch_jobs(lambda: _count_jobs(reads))
        if resolved.run_worker if run_worker is None else run_worker:
            state.worker = Worker(settings=resolved, sessions=writes, host=state.host, metrics=metrics)
            state.worker.start_in_thread()
        app.state.batchsize = state
        log.info("batchsize-service %s ready on %s (%s)", __version__, state.host.type, state.host.name)
        try:
            yield
        finally:
            if state.worker is not None:
                state.worker.stop()  # a running probe is cancelled and its job re-queued
            engine.dispose()

    app = FastAPI(
        title="batchsize-service",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served by service.api.ui from vendored assets: no CDN
        redoc_url=None,
        generate_unique_id_function=operation_id,
    )
    metrics = app.state.metrics = Metrics()
    install_error_handlers(app)
    v1 = [Depends(require_api_key)]
    app.include_router(recommendations.router, dependencies=v1)
    app.include_router(catalog.router, dependencies=v1)
    app.include_router(artifacts.router, dependencies=v1)
    app.include_router(workers.router, dependencies=v1)
    app.include_router(health.router)
    app.include_router(metrics_api.router)
    app.include_router(ui.router, dependencies=[Depends(require_page_access)])  # no session: to /login
    app.include_router(ui.login_router)
    app.include_router(ui.docs_router)
    app.mount(ui.STATIC_URL, StaticFiles(directory=ui.STATIC_DIR), name="static")
    _document_write_refusals(app)
    app.add_middleware(CachedAnswers, job_path=recommendations.JOB_PATH)  # innermost
    app.add_middleware(
        BodySizeLimit,
        max_bytes=resolved.max_body_bytes,
        upload_paths={"/v1/artifacts": resolved.max_upload_bytes + UPLOAD_FORM_OVERHEAD},
    )
    app.add_middleware(CrossSiteGuard, allowed_origins=resolved.cors_origins)  # before any body is read
    app.add_middleware(UnexpectedErrors)  # JSON 500/503 for whatever the app or a middleware inside raises
    if resolved.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=resolved.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "Location"],
        )
    app.add_middleware(RequestContext, metrics=metrics)  # outermost: 413s and 500s get a request id too
    return app


def _document_write_refusals(app: FastAPI) -> None:
    """State-changing operations can also answer 403 (cross-site, service.security) and 503 (storage
    refuses writes, service.errors): say so in the OpenAPI document, whichever router they come from."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()  # FastAPI's generator: it also keeps the schema in app.openapi_schema
        for operations in schema.get("paths", {}).values():
            for method, operation in operations.items():
                if method.upper() in UNSAFE_METHODS:
                    for code, entry in error_responses(403, 503).items():
                        documented = {"description": entry["description"], "content": entry["content"]}
                        operation.setdefault("responses", {}).setdefault(str(code), documented)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def operation_id(route: APIRoute) -> str:
    """OpenAPI operationIds are the handlers' names (`create_recommendation`): what generated clients call."""
    return route.name


def _count_jobs(reads: sessionmaker[Session]) -> dict[str, int]:
    from service import repository

    with session_scope(reads) as session:
        return repository.count_by_status(session)


class BodySizeLimit:
    """Refuse bodies over the limit with 413, whether or not the client sent Content-Length.

    Without Content-Length (a chunked body) the limit is found while the app reads: whatever the app
    makes of the cut-off body (an error, a 400) is replaced by the 413. `upload_paths` gives routes
    that take file uploads their own, larger limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, upload_paths: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_paths = upload_paths or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_paths.get(scope.get("path", ""), self.max_bytes)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _send_too_large(send, limit)
                return
        received = 0
        over = started = False

        async def limited_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over:  # the app's answer to the cut-off body (FastAPI: a 400 parse error) becomes the 413
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await _send_too_large(send, limit)


class _BodyTooLarge(Exception):
    pass


async def _send_too_large(send: Send, limit: int) -> None:
    import json

    body = json.dumps(
        {
            "error": {
                "code": "payload_too_large",
                "message": f"request body exceeds {limit} bytes",
                "details": None,
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
