"""Pages for people: the report of a recommendation, an index with a request form, and offline API docs.

Server-rendered Jinja2; plots are inline SVG drawn by service.report. Nothing is fetched from a CDN:
Swagger UI and ReDoc are vendored under service/static (see its README.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi import Path as PathParam
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from service.api.deps import (
    SESSION_COOKIE,
    SESSION_MAX_AGE_S,
    ReadSession,
    api_key_problem,
    session_token,
    session_valid,
)
from service.errors import error_responses
from service.recommendations import service as use_cases
from service.report import build_report, index_row
from service.zoo import describe_zoo

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
STATIC_URL = "/static"

templates = Jinja2Templates(directory=TEMPLATES_DIR)

router = APIRouter()
"""The HTML pages that read recommendations (included with deps.require_page_access)."""

login_router = APIRouter(include_in_schema=False)
"""/login and /logout: a browser trades the API key for a session cookie (open: they check the key)."""

docs_router = APIRouter(include_in_schema=False)
"""/docs and /redoc from the vendored assets (no API key: they only show the OpenAPI document)."""

RecommendationId = Annotated[
    str, PathParam(min_length=1, max_length=64, description="The recommendation's id.")
]

_REPORT_EXAMPLE = (
    "<!doctype html><html><head><title>Batch size report</title></head><body>"
    "<h1>Batch size recommendation</h1><section class='recipe'>…</section><svg class='plot'>…</svg>"
    "</body></html>"
)


@router.get(
    "/v1/recommendations/{recommendation_id}/report",
    response_class=HTMLResponse,
    tags=["recommendations"],
    summary="A recommendation's report as a self-contained HTML page with plots",
    description=(
        "The recipe at the top, then plots of peak memory (trials, fitted memory model, budget, chosen "
        "maximum), throughput, predicted time to target and the gradient noise scale, and the trials "
        "table. Works offline: no scripts or styles from elsewhere. While the job is queued or running, "
        "the page shows its progress and reloads itself every 2 seconds."
    ),
    responses={
        200: {"description": "The report", "content": {"text/html": {"example": _REPORT_EXAMPLE}}},
        **error_responses(401, 404, 422),
    },
)
def get_report(recommendation_id: RecommendationId, request: Request, session: ReadSession) -> HTMLResponse:
    public = use_cases.to_public(use_cases.get_recommendation(session, recommendation_id))
    report = build_report(public, use_cases.list_trials(session, recommendation_id))
    return templates.TemplateResponse(request, "report.html", {"report": report, "static": STATIC_URL})


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def index(request: Request, session: ReadSession) -> HTMLResponse:
    items, total = use_cases.list_recommendations(session, limit=25)
    rows = [index_row(public) for public in items]
    context = {"rows": rows, "total": total, "zoo": describe_zoo(), "static": STATIC_URL}
    return templates.TemplateResponse(request, "index.html", context)


def _safe_next(target: str | None) -> str:
    """Where to go after login: a path on this site only (never another host)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


@login_router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "/") -> Response:
    settings = request.app.state.batchsize.settings
    if not settings.api_key or session_valid(settings.api_key, request.cookies.get(SESSION_COOKIE)):
        return RedirectResponse(_safe_next(next), status_code=303)
    context = {"next": _safe_next(next), "error": None, "static": STATIC_URL}
    return templates.TemplateResponse(request, "login.html", context)


@login_router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    api_key: Annotated[str, Form(max_length=4096)] = "",
    next: Annotated[str, Form(max_length=2048)] = "/",
) -> Response:
    """Check the key once; answer with a session cookie (HttpOnly, SameSite=Strict) and go on."""
    expected = request.app.state.batchsize.settings.api_key
    if not expected:
        return RedirectResponse(_safe_next(next), status_code=303)
    if api_key_problem(expected, api_key or None) is not None:
        error = "That is not the service's API key."
        context = {"next": _safe_next(next), "error": error, "static": STATIC_URL}
        return templates.TemplateResponse(request, "login.html", context, status_code=401)
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        session_token(expected),
        max_age=SESSION_MAX_AGE_S,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@login_router.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


@docs_router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=request.app.openapi_url,
        title=f"{request.app.title} — API docs",
        swagger_js_url=f"{STATIC_URL}/swagger-ui/swagger-ui-bundle.js",
        swagger_css_url=f"{STATIC_URL}/swagger-ui/swagger-ui.css",
        swagger_favicon_url=f"{STATIC_URL}/swagger-ui/favicon-32x32.png",
        oauth2_redirect_url=None,
        swagger_ui_parameters={"validatorUrl": None, "tryItOutEnabled": False},
    )


@docs_router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(
        openapi_url=request.app.openapi_url,
        title=f"{request.app.title} — API reference",
        redoc_js_url=f"{STATIC_URL}/redoc/redoc.standalone.js",
        redoc_favicon_url=f"{STATIC_URL}/swagger-ui/favicon-32x32.png",
        with_google_fonts=False,
    )
