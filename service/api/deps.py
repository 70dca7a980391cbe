"""FastAPI dependencies: routes declare what they need (`ReadSession`, `WriteSession`, `State`)."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader
from sqlalchemy.orm import Session

from service.db.session import session_scope
from service.errors import Unauthorized
from service.state import AppState


async def get_state(request: Request) -> AppState:  # async: no thread-pool hop for a lookup
    return request.app.state.batchsize


State = Annotated[AppState, Depends(get_state)]


def _read_session(state: State) -> Iterator[Session]:
    with session_scope(state.reads) as session:
        yield session


def _write_session(state: State) -> Iterator[Session]:
    with session_scope(state.writes) as session:
        yield session


# scope="function": the transaction ends when the handler returns, before the response is serialised
# and sent, so a writer never holds SQLite's lock while it waits for a thread to finish its response.
ReadSession = Annotated[Session, Depends(_read_session, scope="function")]
# Writers queue here (without taking a thread) rather than on SQLite's busy timeout.
WriteSession = Annotated[Session, Depends(_write_session, scope="function", max_concurrency=4)]

API_KEY_HEADER = b"x-api-key"  # as ASGI spells header names
_api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="Required when BATCHSIZE_API_KEY is set."
)


async def require_api_key(
    request: Request, api_key: Annotated[str | None, Security(_api_key_header)]
) -> None:
    """When an API key is configured, every /v1 route requires it."""
    expected = request.app.state.batchsize.settings.api_key  # not via State: one dependency less per call
    if problem := api_key_problem(expected, api_key):
        raise problem


def api_key_problem(expected: str | None, given: str | None) -> Unauthorized | None:
    """Why `given` does not pass for the configured key `expected` (None: it passes); constant time."""
    if not expected:
        return None
    if given is None:
        return Unauthorized("missing X-API-Key header", code="missing_api_key")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        return Unauthorized("wrong API key", code="wrong_api_key")
    return None
