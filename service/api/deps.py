"""FastAPI dependencies: routes declare what they need (`ReadSession`, `WriteSession`, `State`)."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterator
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, HTTPException, Request, Security, status
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
    """When an API key is configured, every /v1 route requires it: the X-API-Key header, or (from a
    browser that logged in) a valid session cookie."""
    expected = request.app.state.batchsize.settings.api_key  # not via State: one dependency less per call
    if api_key is None and expected and session_valid(expected, request.cookies.get(SESSION_COOKIE)):
        return
    if problem := api_key_problem(expected, api_key):
        raise problem


async def require_page_access(
    request: Request, api_key: Annotated[str | None, Security(_api_key_header)]
) -> None:
    """The HTML pages: like require_api_key, but a browser (it accepts text/html) without a session is sent
    to the login page; other clients get the same 401 as the API."""
    expected = request.app.state.batchsize.settings.api_key
    if not expected or session_valid(expected, request.cookies.get(SESSION_COOKIE)):
        return
    if api_key is not None or "text/html" not in request.headers.get("accept", ""):
        if problem := api_key_problem(expected, api_key):
            raise problem
        return
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    raise HTTPException(
        status.HTTP_303_SEE_OTHER, "log in first", headers={"Location": f"/login?next={quote(target)}"}
    )


# ------------------------------------------------------------------------------------------ sessions
# A browser cannot send X-API-Key: it gives the key once to /login and gets a session cookie instead,
# "<issued>.<HMAC-SHA256(key, issued)>". Nothing is stored on the server; changing the key ends every
# session, and a session ends SESSION_MAX_AGE_S after login (or at logout, when the browser drops it).

SESSION_COOKIE = "batchsize_session"
SESSION_MAX_AGE_S = 12 * 3600


def session_token(api_key: str, issued: int | None = None) -> str:
    """A session cookie's value for `api_key`, issued now (or at `issued`, seconds since the epoch)."""
    issued = int(time.time()) if issued is None else issued
    return f"{issued}.{_session_mac(api_key, issued)}"


def session_valid(api_key: str, token: str | None, now: float | None = None) -> bool:
    """Whether `token` is a session for `api_key` that has not expired (constant-time comparison)."""
    if not token or "." not in token:
        return False
    issued_text, mac = token.split(".", 1)
    if not issued_text.isdigit() or len(issued_text) > 12:
        return False
    issued = int(issued_text)
    age = (time.time() if now is None else now) - issued
    if not -60 <= age <= SESSION_MAX_AGE_S:
        return False
    return hmac.compare_digest(mac.encode(), _session_mac(api_key, issued).encode())


def _session_mac(api_key: str, issued: int) -> str:
    return hmac.new(api_key.encode(), f"batchsize-session:{issued}".encode(), hashlib.sha256).hexdigest()


def api_key_problem(expected: str | None, given: str | None) -> Unauthorized | None:
    """Why `given` does not pass for the configured key `expected` (None: it passes); constant time."""
    if not expected:
        return None
    if given is None:
        return Unauthorized("missing X-API-Key header", code="missing_api_key")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        return Unauthorized("wrong API key", code="wrong_api_key")
    return None
