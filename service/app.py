"""The app factory. Nothing happens at import time: settings, engine and worker are built in the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from service import __version__
from service.api import catalog, health, recommendations
from service.api.deps import require_api_key
from service.config import Settings
from service.db import migrate
from service.db.session import make_engine, make_session_factories
from service.errors import install_error_handlers
from service.state import AppState, detect_host
from service.worker import Worker

log = logging.getLogger(__name__)

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
        migrate.upgrade(url)
        engine = make_engine(resolved)
        reads, writes = make_session_factories(engine)
        state = AppState(
            settings=resolved, engine=engine, reads=reads, writes=writes, host=detect_host(resolved)
        )
        if resolved.run_worker if run_worker is None else run_worker:
            state.worker = Worker(settings=resolved, sessions=writes, host=state.host)
            state.worker.start_in_thread()
        app.state.batchsize = state
        log.info("batchsize-service %s ready on %s (%s)", __version__, state.host.type, state.host.name)
        try:
            yield
        finally:
            if state.worker is not None:
                state.worker.stop()
            engine.dispose()

    app = FastAPI(
        title="batchsize-service",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    install_error_handlers(app)
    v1 = [Depends(require_api_key)]
    app.include_router(recommendations.router, dependencies=v1)
    app.include_router(catalog.router, dependencies=v1)
    app.include_router(health.router)
    app.add_middleware(BodySizeLimit, max_bytes=resolved.max_body_bytes)
    return app


class BodySizeLimit:
    """Refuse bodies over the limit with 413, whether or not the client sent Content-Length."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _send_too_large(send, limit)
                return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
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
