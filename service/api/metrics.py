"""GET /metrics: Prometheus text format. Not under /v1: it never needs an API key."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import exposition

# The classic text format (0.0.4), which every Prometheus version parses.
CONTENT_TYPE = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST)

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description=(
        "HTTP requests by route template, method and status; request latency; jobs by status (read from "
        "the database at each scrape); probe durations; probe trials; process metrics."
    ),
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Metrics"}},
)
def metrics(request: Request) -> Response:
    body = request.app.state.metrics.render()
    return Response(content=body, media_type=CONTENT_TYPE)
