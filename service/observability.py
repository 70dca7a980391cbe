"""Operations: structured logs carrying a request id, and Prometheus metrics.

- `configure_logging(fmt, level)` sets up the process's logging: one JSON object a line (default for
  `batchsize serve`) or plain text. Every record carries the id of the request it was logged under.
- `RequestContext` (ASGI middleware) takes the client's `X-Request-ID` (or makes one), sends it back,
  logs one line per request and counts it in the metrics, labelled by route template, not raw path.
- `Metrics` holds one app's Prometheus registry; `GET /metrics` (service.api.metrics) renders it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.status import JobStatus

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")

request_id_var: ContextVar[str | None] = ContextVar("batchsize_request_id", default=None)

access_log = logging.getLogger("batchsize.access")

# --- logging -------------------------------------------------------------------------------------

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged as a field.
_RECORD_ATTRS = set(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "request_id",
    "taskName",
    "color_message",  # uvicorn's ANSI-coloured copy
}


class RequestIdFilter(logging.Filter):
    """Stamp each record with the id of the request it was logged under (None outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, message, request_id, extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id_var.get(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(entry, default=str, ensure_ascii=False)


_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(fmt: str = "json", level: str | int = "info") -> logging.Handler:
    """Send all logging (this service's and uvicorn's) through one stderr handler in the given format.

    Replaces the root logger's handlers; uvicorn's loggers lose their own handlers and propagate to it.
    """
    handler = _StderrHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True

    return handler


# --- metrics -------------------------------------------------------------------------------------


class JobsByStatus(Collector):
    """`batchsize_jobs{status}`: read from the database at each scrape, so it is right across processes."""

    def __init__(self, count_by_status: Callable[[], Mapping[str, int]]) -> None:
        self._count = count_by_status

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [GaugeMetricFamily("batchsize_jobs", "Recommendation jobs by status.", labels=["status"])]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("batchsize_jobs", "Recommendation jobs by status.", labels=["status"])
        try:
            counts = self._count()
        except Exception:  # a scrape must not fail because the database is away for a moment
            logging.getLogger(__name__).warning("could not count jobs for /metrics", exc_info=True)
            return []
        for status in sorted({*(status.value for status in JobStatus), *counts}):
            family.add_metric([status], counts.get(status, 0))
        return [family]


class Metrics:
    """One app's Prometheus registry (one per app, so tests can build many apps in one process)."""

    def __init__(self) -> None:
        from prometheus_client import PlatformCollector, ProcessCollector

        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.http_requests = Counter(
            "batchsize_http_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "batchsize_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template and method.",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self.probe_duration = Histogram(
            "batchsize_probe_duration_seconds",
            "Wall time of one probe subprocess run, by how the job ended.",
            ["outcome"],
            buckets=(1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600),
            registry=self.registry,
        )
        self.trials = Counter(
            "batchsize_probe_trials",
            "Probe trials run (real training steps at one batch size), by phase and outcome.",
            ["phase", "outcome"],
            registry=self.registry,
        )
        self._jobs: JobsByStatus | None = None

    def watch_jobs(self, count_by_status: Callable[[], Mapping[str, int]]) -> None:
        """Report `batchsize_jobs{status}` from this callable at each scrape (set in the lifespan)."""
        if self._jobs is not None:
            self.registry.unregister(self._jobs)
        self._jobs = JobsByStatus(count_by_status)
        self.registry.register(self._jobs)

    def observe_probe(self, outcome: str, seconds: float) -> None:
        self.probe_duration.labels(outcome=outcome).observe(seconds)

    def count_trial(self, event: Mapping[str, Any]) -> None:
        phase = str(event.get("phase") or "unknown")[:32]
        outcome = str(event.get("outcome") or "ok")[:32]
        self.trials.labels(phase=phase, outcome=outcome).inc()

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# --- request middleware --------------------------------------------------------------------------


def _route_template(scope: Scope) -> str:
    """The matched route's template (`/v1/recommendations/{recommendation_id}`): bounded label values."""
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    if isinstance(path, str):
        return path
    if scope.get("endpoint") is not None:  # a mounted app (static files): its mount point
        return f"{scope.get('root_path', '')}/{{path}}"
    return "<unmatched>"


def _incoming_request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _REQUEST_ID_RE.match(text):
                return text
            break
    return uuid.uuid4().hex


class RequestContext:
    """Outermost middleware: request id in and out, one access log line and metrics per request."""

    def __init__(self, app: ASGIApp, metrics: Metrics | None = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope)
        token = request_id_var.set(request_id)
        header = (b"x-request-id", request_id.encode("latin-1"))
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            status = 500
            access_log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            raise
        finally:
            elapsed = time.perf_counter() - start
            route = _route_template(scope)
            method = scope.get("method", "")
            if self.metrics is not None:
                self.metrics.http_requests.labels(method=method, route=route, status=str(status)).inc()
                self.metrics.http_latency.labels(method=method, route=route).observe(elapsed)
            if access_log.isEnabledFor(logging.INFO):
                _log_access(scope, method, route, status, elapsed)
            request_id_var.reset(token)


def _log_access(scope: Scope, method: str, route: str, status: int, elapsed: float) -> None:
    """One line per request, built with makeRecord + handle: no caller lookup (a fifth of a log call)."""
    client = scope.get("client")
    path = scope.get("path", "")
    extra = {
        "method": method,
        "path": path,
        "route": route,
        "status": status,
        "duration_ms": round(elapsed * 1000, 2),
        "client": f"{client[0]}:{client[1]}" if client else None,
    }
    args = (method, path, status, elapsed * 1000)
    message = "%s %s %d %.1fms"
    record = access_log.makeRecord(
        access_log.name, logging.INFO, __file__, 0, message, args, None, extra=extra
    )
    access_log.handle(record)
