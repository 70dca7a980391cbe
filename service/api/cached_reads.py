"""Fast paths for what pipelines repeat, answered before routing.

- `GET /v1/recommendations/{id}` of a finished job. Pipelines poll a recommendation until it finishes
  and then keep reading it; a finished job never changes, so its JSON is kept in
  `AppState.finished_jobs` (filled by `service/recommendations/routes.py`).
- `POST /v1/recommendations` repeating a request that already succeeded. The route remembers which
  request bodies validated to a memoisable request (`AppState.request_keys`: digest of content type
  and body -> answer key); the same bytes again are answered from `AppState.memoised_answer` without
  parsing or validating them. `force` is part of the body, and the route never remembers a forced body.

Routing, dependency resolution and validation cost more than these answers themselves. Anything else,
a cache miss, or a request the API key check would refuse, goes on to the app unchanged (a body read
here is replayed to it), so the app still owns every other outcome (404, 401, 413, 422).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.deps import API_KEY_HEADER, api_key_problem
from service.state import AppState

PREFIX = "/v1/recommendations/"
COLLECTION = PREFIX.rstrip("/")
BODY_DIGEST = "batchsize.body_digest"  # scope key: the route reads the digest of the body it validated
MEMO_BODY_LIMIT = 64 * 1024  # larger bodies are passed on unread (requests are ~200 bytes)


@dataclass(frozen=True)
class AnsweredRoute:
    """Stands in for the route the app would have matched: observability labels requests by its path."""

    path: str


def body_digest(content_type: bytes, body: bytes) -> str:
    """What identifies a request body to the route: the app parses the same bytes the same way."""
    return hashlib.sha256(content_type + b"\n" + body).hexdigest()


class CachedAnswers:
    def __init__(self, app: ASGIApp, job_path: str) -> None:
        self.app = app
        self.job_route = AnsweredRoute(job_path)
        self.collection_route = AnsweredRoute(COLLECTION)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state: AppState | None = getattr(scope["app"].state, "batchsize", None) if "app" in scope else None
        if scope["type"] != "http" or state is None:
            await self.app(scope, receive, send)
        elif (
            scope["method"] == "GET"
            and (body := _finished_job(state, scope["path"])) is not None
            and _key_accepted(state, scope)
        ):
            scope["route"] = self.job_route
            await _send_json(send, 200, body)
        elif scope["method"] == "POST" and scope["path"] == COLLECTION and _key_accepted(state, scope):
            await self._repeated_request(state, scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _repeated_request(self, state: AppState, scope: Scope, receive: Receive, send: Send) -> None:
        messages, body = await _read_body(receive)
        if body is not None:
            content_type = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
            digest = body_digest(content_type, body)
            key = state.request_keys.get(digest)
            if key is not None and (answer := state.memoised_answer(key)) is not None:
                scope["route"] = self.collection_route
                answered_id, cached = answer
                await _send_json(send, 200, cached, location=f"{PREFIX}{answered_id}")
                return
            scope[BODY_DIGEST] = digest

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def _key_accepted(state: AppState, scope: Scope) -> bool:
    """Whether the API key check the routes depend on would let this request through."""
    if not state.settings.api_key:
        return True
    given = next((v for k, v in scope["headers"] if k == API_KEY_HEADER), None)
    return api_key_problem(state.settings.api_key, None if given is None else given.decode("latin-1")) is None


def _finished_job(state: AppState, path: str) -> bytes | None:
    if not path.startswith(PREFIX) or "/" in path[len(PREFIX) :]:
        return None
    return state.finished_jobs.get(path[len(PREFIX) :])


async def _read_body(receive: Receive) -> tuple[list[Message], bytes | None]:
    """The messages read, and the whole body; None when it is over MEMO_BODY_LIMIT or the client left."""
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, None
        size += len(message.get("body", b""))
        if size > MEMO_BODY_LIMIT:
            return messages, None
        if not message.get("more_body", False):
            return messages, b"".join(m.get("body", b"") for m in messages)


async def _send_json(send: Send, status: int, body: bytes, location: str | None = None) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if location is not None:
        headers.append((b"location", location.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
