"""Domain errors carry their HTTP status; one handler renders them all the same way."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException


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
        404: "Not found",
        409: "Conflict with the resource's current state",
        413: "Body or upload too large",
        415: "Unsupported media type",
        422: "The request is well-formed but invalid; `details` names the fields",
    }
    # Errors are JSON even on routes whose own response is not (the HTML report): say so explicitly.
    json_content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    return {
        code: {"model": ErrorResponse, "description": descriptions[code], "content": json_content}
        for code in codes
    }


def _render(
    status_code: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
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
        return _render(exc.status_code, exc.code, exc.message, exc.details)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, details = _describe_validation_errors(list(exc.errors()))
        return _render(422, "validation_error", message, details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Keep the exception's headers; a 405's `Allow` lists every route's methods on that path (Starlette
        # names only the first route's, e.g. `POST` where `GET` is also served).
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(_request) or headers.get("Allow", "")
        return _render(exc.status_code, f"http_{exc.status_code}", str(exc.detail), headers=headers or None)


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
