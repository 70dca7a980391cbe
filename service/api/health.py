"""Liveness and readiness. Not under /v1: they never need an API key."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.api.deps import State
from service.schemas import Health, Readiness

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)


@router.get("/healthz", response_model=Health, summary="The process is up")
def healthz() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="The database answers and takes writes, the disk has room, the in-process worker is alive",
    responses={503: {"model": Readiness, "description": "Not ready"}},
)
def readyz(state: State) -> JSONResponse:
    database = _database_answers(state.engine)
    writable = database and _database_writable(state.writes)
    disk_free = _disk_free_bytes(state.settings.data_dir)
    disk_ok = disk_free is None or disk_free >= state.settings.min_free_disk_bytes
    worker = state.worker.alive if state.worker is not None else None
    ready = database and writable and disk_ok and worker is not False
    body = Readiness(
        status="ready" if ready else "not_ready",
        database=database,
        writable=writable,
        disk_free_bytes=disk_free,
        worker=worker,
    )
    return JSONResponse(status_code=200 if ready else 503, content=body.model_dump())


def _database_answers(engine: Engine) -> bool:
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return True
    except Exception:
        log.warning("readiness: the database does not answer", exc_info=True)
        return False


def _database_writable(writes: sessionmaker[Session]) -> bool:
    """Try a real write and roll it back: a read-only file or mount only shows when something writes."""
    try:
        with writes() as session:
            session.execute(text("UPDATE alembic_version SET version_num = version_num"))
            session.rollback()
        return True
    except OperationalError as exc:
        if "database is locked" in str(exc.orig):  # another writer holds the lock: writes do work
            return True
        log.warning("readiness: the database refuses writes: %s", exc.orig)
        return False
    except Exception:
        log.warning("readiness: the database refuses writes", exc_info=True)
        return False


def _disk_free_bytes(data_dir: Path) -> int | None:
    """Free bytes on the data directory's disk (its nearest existing parent's); None if unknown."""
    path = Path(data_dir).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None
