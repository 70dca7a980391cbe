"""Defences against hostile requests that are not about one route's rules.

- `CrossSiteGuard` (middleware): a state-changing request (POST, PUT, PATCH, DELETE) sent by a browser
  page of another origin is refused with a JSON 403 `cross_site_request`. A web page can otherwise make
  a visitor's browser send a "simple" form POST (an upload, say) to a service on their own machine.
  Browsers always send `Origin` on such requests, and `Sec-Fetch-Site`, neither of which a page can
  forge; clients that are not browsers (curl, pipelines, the Python client) send neither and pass, and
  so do the service's own pages (same origin). Origins listed in `BATCHSIZE_CORS_ORIGINS` pass too.
- `json_depth` / `json_text_depth`: nesting depth of a parsed value or a JSON text, without recursion,
  so free-form JSON fields can be bounded before anything recurses over them (`MAX_JSON_DEPTH`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import InvalidRequest, error_response

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Deepest nesting accepted in a free-form JSON field (zoo configs nest 2 deep: an object of lists).
MAX_JSON_DEPTH = 16


class CrossSiteGuard:
    """Refuse state-changing requests from browser pages of other origins (see the module's docstring)."""

    def __init__(self, app: ASGIApp, allowed_origins: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed = {_normal_origin(origin) for origin in allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in UNSAFE_METHODS:
            problem = cross_site_problem(dict(scope["headers"]), allowed=self.allowed)
            if problem is not None:
                response = error_response(403, "cross_site_request", problem)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def cross_site_problem(headers: Mapping[bytes, bytes], *, allowed: Collection[str] = ()) -> str | None:
    """Why a state-changing request with these (ASGI, lower-case) headers is refused; None: it passes."""
    fetch_site = headers.get(b"sec-fetch-site", b"").decode("latin-1").lower()
    if fetch_site in ("same-origin", "none"):  # set by the browser itself: a page cannot forge it
        return None
    origin = headers.get(b"origin")
    if origin is None:
        if fetch_site in ("cross-site", "same-site"):
            return f"state-changing requests from other sites are refused (Sec-Fetch-Site: {fetch_site})"
        return None  # not sent by a browser page: curl, pipelines, the Python client
    origin_text = origin.decode("latin-1")
    if "*" in allowed or _normal_origin(origin_text) in allowed:
        return None
    origin_host = _origin_host(origin_text)
    if origin_host is not None and origin_host == _normal_host(headers.get(b"host", b"").decode("latin-1")):
        return None
    return (
        f"state-changing requests from pages of another origin ({origin_text[:200]}) are refused; "
        "allow an origin with BATCHSIZE_CORS_ORIGINS"
    )


def _normal_origin(origin: str) -> str:
    """`scheme://host[:port]` lower-cased, without a default port or a trailing slash."""
    parts = urlsplit(origin.strip().rstrip("/").lower())
    if not parts.scheme or not parts.hostname:
        return origin.strip().lower()  # "null", "*" or garbage: compared as given
    return f"{parts.scheme}://{_host_port(parts.hostname, _port(parts))}"


def _origin_host(origin: str) -> str | None:
    """The `host[:port]` an origin names, as `_normal_host` writes a Host header."""
    parts = urlsplit(origin.strip().lower())
    if not parts.scheme or not parts.hostname:
        return None
    return _host_port(parts.hostname, _port(parts))


def _normal_host(host: str) -> str | None:
    parts = urlsplit(f"//{host.strip().lower()}")
    if not parts.hostname:
        return None
    return _host_port(parts.hostname, _port(parts))


def _port(parts: Any) -> int | None:
    try:
        return parts.port
    except ValueError:  # a port that is not a number
        return -1


def _host_port(hostname: str, port: int | None) -> str:
    # Default ports are dropped whatever the scheme: behind a TLS-terminating proxy the page's origin is
    # https://host while the service is reached as plain http.
    host = f"[{hostname}]" if ":" in hostname else hostname
    return host if port in (None, 80, 443) else f"{host}:{port}"


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value: 0 for a scalar, 1 for a flat list or object."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def json_text_depth(text: str) -> int:
    """Nesting depth of a JSON text, counted on its brackets (outside strings) before parsing it."""
    deepest = depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def check_form_json(**fields: str | None) -> None:
    """Refuse (422) a JSON form field nested deeper than MAX_JSON_DEPTH before it is parsed: the
    standard library's parser recurses once per level."""
    for name, text in fields.items():
        if text is not None and json_text_depth(text) > MAX_JSON_DEPTH:
            raise InvalidRequest(
                f"form field {name} nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_model_spec"
            )
