"""A fast path for polling: `GET /v1/recommendations/{id}` of a finished job, answered before routing.

Pipelines poll a recommendation until it finishes and then keep reading it; a finished job never
changes, so its JSON is kept in `AppState.finished_jobs` (filled by the route in recommendations.py).
This ASGI middleware answers those reads from that cache without FastAPI's routing, dependency
resolution and validation, which cost more than the answer itself. Anything else, a cache miss, or a
request the API key check would refuse, goes on to the app unchanged, so the app still owns every
other outcome (404, 401, 422).
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.deps import API_KEY_HEADER, api_key_problem

PREFIX = "/v1/recommendations/"


@dataclass(frozen=True)
class AnsweredRoute:
    """Stands in for the route the app would have matched: observability labels requests by its path."""

    path: str


class FinishedJobReads:
    def __init__(self, app: ASGIApp, route_path: str) -> None:
        self.app = app
        self.route = AnsweredRoute(route_path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = self._cached_body(scope) if scope["type"] == "http" and scope["method"] == "GET" else None
        if body is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def _cached_body(scope: Scope) -> bytes | None:
        path: str = scope["path"]
        if not path.startswith(PREFIX) or "/" in path[len(PREFIX) :]:
            return None
        state = getattr(scope["app"].state, "batchsize", None)
        if state is None:
            return None
        body = state.finished_jobs.get(path[len(PREFIX) :])
        if body is None:
            return None
        if state.settings.api_key:
            given = next((v for k, v in scope["headers"] if k == API_KEY_HEADER), None)
            if api_key_problem(state.settings.api_key, given and given.decode("latin-1")) is not None:
                return None
        return body
