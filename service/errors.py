"""Domain errors carry their HTTP status; one handler renders them all the same way.

Nothing leaves as a bare 500: `UnexpectedErrors` (middleware) answers any exception the app or a
middleware inside it raises with the JSON envelope, a 503 naming the problem when storage refused a
write (read-only database or disk, full disk), else a 500 carrying the request id, logged with its
traceback. `client_message` turns a probe's error text into what a client is shown.
"""

from __future__ import annotations

import errno
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.observability import REQUEST_ID_HEADER, request_id_var

log = logging.getLogger(__name__)


class ServiceError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code:
            self.code = code


class NotFound(ServiceError):
    status_code = 404
    code = "not_found"


class InvalidRequest(ServiceError):
    status_code = 422
    code = "invalid_request"


class Conflict(ServiceError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(ServiceError):
    status_code = 413
    code = "payload_too_large"


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"


class Forbidden(ServiceError):
    status_code = 403
    code = "forbidden"


class ServiceUnavailable(ServiceError):
    """The service cannot do this now (storage refuses writes); the client may retry later."""

    status_code = 503
    code = "service_unavailable"


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx this service sends has this shape."""

    error: ErrorBody


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer with."""
    descriptions = {
        400: "Malformed request",
        401: "Missing or wrong API key",
        403: "A state-changing request from a browser page of another origin (`cross_site_request`)",
        404: "Not found",
        409: "Conflict with the resource's current state",
        413: "Body or upload too large",
        415: "Unsupported media type",
        422: "The request is well-formed but invalid; `details` names the fields",
        500: "Unexpected error; `details.request_id` names the logged request",
        503: "Storage refuses writes (`database_read_only`, `storage_full`, ...); reads keep working",
    }
    # Errors are JSON even on routes whose own response is not (the HTML report): say so explicitly.
    json_content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    return {
        code: {"model": ErrorResponse, "description": descriptions[code], "content": json_content}
        for code in codes
    }


def error_response(
    status_code: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The JSON error envelope every 4xx/5xx of this service has."""
    body = ErrorResponse(error=ErrorBody(code=code, message=message, details=details))
    return JSONResponse(status_code=status_code, content=body.model_dump(mode="json"), headers=headers)


def _describe_validation_errors(errors: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    details = []
    for error in errors:
        location = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        details.append({"field": location, "message": error.get("msg", "invalid"), "type": error.get("type")})
    message = "; ".join(f"{d['field'] or 'body'}: {d['message']}" for d in details) or "invalid request"
    return message, details


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status_code, exc.code, exc.message, exc.details)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, details = _describe_validation_errors(list(exc.errors()))
        return error_response(422, "validation_error", message, details)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Last resort, for an error in the outermost middleware itself (UnexpectedErrors, inside it,
        # answers everything else): Starlette's ServerErrorMiddleware calls this instead of a bare 500.
        # Not logged here: the server logs what this middleware re-raises.
        request_id = request_id_var.get() or request.headers.get(REQUEST_ID_HEADER)
        return unexpected_error_response(exc, request_id)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Keep the exception's headers; a 405's `Allow` lists every route's methods on that path (Starlette
        # names only the first route's, e.g. `POST` where `GET` is also served).
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(_request) or headers.get("Allow", "")
        message = str(exc.detail)
        if isinstance(exc.__cause__, RecursionError):  # FastAPI's "error parsing the body", from json.loads
            message = "the JSON body nests deeper than the parser allows"
        return error_response(exc.status_code, f"http_{exc.status_code}", message, headers=headers or None)


def _allowed_methods(request: Request) -> str | None:
    import fastapi.routing

    iter_contexts = getattr(fastapi.routing, "iter_route_contexts", None)  # FastAPI with included routers
    routes = iter_contexts(request.app.routes) if iter_contexts else request.app.routes
    path = request.scope.get("path", "")
    methods: set[str] = set()
    for route in routes:
        regex, route_methods = getattr(route, "path_regex", None), getattr(route, "methods", None)
        if regex is not None and route_methods and regex.match(path):
            methods |= set(route_methods)
    return ", ".join(sorted(methods)) or None


# --- anything unexpected -------------------------------------------------------------------------

# SQLite and PostgreSQL messages for writes the storage refuses -> (code, what the client reads).
_STORAGE_MESSAGES = (
    ("readonly database", "database_read_only", "the database is read-only"),
    ("read-only transaction", "database_read_only", "the database is read-only"),
    ("disk is full", "storage_full", "the disk holding the database is full"),
    ("disk i/o error", "storage_error", "the database's disk reported an I/O error"),
    ("unable to open database", "database_unavailable", "the database file cannot be opened"),
)
_STORAGE_ERRNOS = {
    errno.ENOSPC: ("storage_full", "the data directory's disk is full"),
    errno.EDQUOT: ("storage_full", "the data directory's disk quota is exhausted"),
    errno.EROFS: ("storage_read_only", "the data directory is on a read-only file system"),
    errno.EACCES: ("storage_not_writable", "the data directory is not writable"),
    errno.EPERM: ("storage_not_writable", "the data directory is not writable"),
}


def storage_error(exc: BaseException) -> ServiceUnavailable | None:
    """The 503 for an exception (or its causes) meaning storage refused the work, else None."""
    from sqlalchemy.exc import DBAPIError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DBAPIError):
            text = str(current.orig if current.orig is not None else current).lower()
            for needle, code, what in _STORAGE_MESSAGES:
                if needle in text:
                    return ServiceUnavailable(f"{what}: this service cannot store anything now", code=code)
            if "database is locked" in text:
                return ServiceUnavailable("the database is busy; retry shortly", code="database_busy")
            if current.connection_invalidated or type(current).__name__ == "OperationalError":
                return ServiceUnavailable("the database is unavailable", code="database_unavailable")
        if isinstance(current, OSError) and current.errno in _STORAGE_ERRNOS:
            code, what = _STORAGE_ERRNOS[current.errno]
            return ServiceUnavailable(f"{what}: this service cannot store anything now", code=code)
        current = current.__cause__ or current.__context__
    return None


def unexpected_error_response(exc: BaseException, request_id: str | None) -> JSONResponse:
    """The envelope for an exception nothing else handled: a 503 when storage refused the work (see
    `storage_error`), else a 500 naming the request id under which the traceback is logged."""
    if (unavailable := storage_error(exc)) is not None:
        return error_response(503, unavailable.code, unavailable.message, {"request_id": request_id})
    message = f"unexpected error; it has been logged under request id {request_id}"
    return error_response(500, "internal_error", message, {"request_id": request_id})


class UnexpectedErrors:
    """Middleware: any exception from the app or a middleware inside this one gets the JSON envelope.

    Place it just inside `RequestContext`, so the answer carries `X-Request-ID` and is counted. Storage
    refusing a write is an expected condition: answered with a 503 and logged as a warning with its
    traceback. Anything else is answered with a 500 and then re-raised, as Starlette's own error
    middleware does: `RequestContext` logs it with the traceback and the request id, the server sees
    it, and test clients raise it unless told not to. When the response had already started, nothing
    more can be sent: the exception goes on as it is.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            request_id = request_id_var.get()
            response = unexpected_error_response(exc, request_id)
            await response(scope, receive, send)
            if response.status_code != 503:
                raise
            where = f"{scope.get('method')} {scope.get('path')}"
            log.warning("%s answered 503: storage refused the work", where, exc_info=exc)


# --- job errors as clients see them ---------------------------------------------------------------

CLIENT_MESSAGE_LIMIT = 500
_PATH = re.compile(r"(?<![\w])(?:[A-Za-z]:)?(?:[/\\][\w.+@~-]+){2,}[/\\]?")
_FRAME_LINE = re.compile(
    r"^(?:File \"|frame #\d+|Exception raised from|Traceback \(most recent call last\)|During handling|"
    r"The above exception|\^+$|~+\^*~*$|#\d+ )"
)
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning)\b:?")


def client_message(text: str | None, *, limit: int = CLIENT_MESSAGE_LIMIT) -> str:
    """What a client is shown of a probe's error text; the full text stays in the logs and trials.

    One line: the first meaningful one (with the exception line of a traceback or stderr tail that it
    introduces), file paths reduced to their last part (no venv or site-packages layout, no data
    directory), no C++ or Python frames, at most `limit` characters.
    """
    lines = [stripped for line in (text or "").splitlines() if (stripped := line.strip())]
    meaningful = [line for line in lines if not _FRAME_LINE.match(line)]
    if not meaningful:
        return "the probe failed without a message"
    if _FRAME_LINE.match(lines[0]):  # a bare traceback: what matters is its last exception line
        head = _last_exception_line(meaningful)
    else:
        head = meaningful[0]
        if head.endswith(":") and len(meaningful) > 1:  # "...; last lines of its stderr:"
            head = f"{head} {_last_exception_line(meaningful[1:])}"
    head = _PATH.sub(lambda match: _last_part(match.group(0)), head)
    head = " ".join(head.split())
    return head if len(head) <= limit else head[: limit - 1].rstrip() + "…"


def _last_exception_line(lines: list[str]) -> str:
    exception_lines = [line for line in lines if _EXCEPTION_LINE.match(line)]
    return (exception_lines or lines)[-1]


def _last_part(path: str) -> str:
    parts = [part for part in re.split(r"[/\\]", path) if part]
    return parts[-1] if parts else path
