"""Liveness and readiness. Not under /v1: they never need an API key."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from service.api.deps import State
from service.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is up")
def healthz() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="The database answers and the in-process worker (if any) is alive",
    responses={503: {"model": Readiness, "description": "Not ready"}},
)
def readyz(state: State) -> JSONResponse:
    try:
        with state.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        database = True
    except Exception:
        database = False
    worker = state.worker.alive if state.worker is not None else None
    ready = database and worker is not False
    body = Readiness(status="ready" if ready else "not_ready", database=database, worker=worker)
    return JSONResponse(status_code=200 if ready else 503, content=body.model_dump())
