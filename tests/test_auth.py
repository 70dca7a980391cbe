"""The optional API key: with BATCHSIZE_API_KEY set, every /v1 route needs it; health routes never do."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import fastapi.routing
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings

KEY = "s3cret-key-0123456789"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    data_dir: Path = tmp_path_factory.mktemp("auth") / "data"
    settings = Settings(data_dir=data_dir, probe_device="cpu", api_key=KEY, _env_file=None)
    with TestClient(create_app(settings, run_worker=False)) as client:
        yield client


def api_routes(app: FastAPI) -> list[tuple[str, set[str]]]:
    """(path, methods) of every route of the app, through included routers on any FastAPI version."""
    iter_contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    routes = list(iter_contexts(app.routes)) if iter_contexts else app.routes
    return [
        (route.path, set(route.methods or ()))
        for route in routes
        if isinstance(getattr(route, "original_route", route), APIRoute)
    ]


def _v1_calls(client: TestClient) -> list[tuple[str, str]]:
    """(method, concrete path) for every /v1 route, path parameters filled with a plausible id."""
    calls = []
    for path, methods in api_routes(client.app):
        if path.startswith("/v1"):
            concrete = re.sub(r"\{[^}]+\}", "0123456789abcdef", path)
            calls += [(method, concrete) for method in sorted(methods - {"HEAD", "OPTIONS"})]
    return calls


def test_every_v1_route_is_covered(keyed: TestClient) -> None:
    calls = _v1_calls(keyed)
    assert ("POST", "/v1/recommendations") in calls
    assert ("GET", "/v1/recommendations/0123456789abcdef") in calls
    assert ("DELETE", "/v1/recommendations/0123456789abcdef") in calls
    assert ("GET", "/v1/models") in calls
    assert len(calls) >= 7


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"X-API-Key": "wrong"}, "wrong_api_key"),
        ({"X-API-Key": ""}, "missing_api_key"),
        ({"X-API-Key": KEY[:-1]}, "wrong_api_key"),
        ({"X-API-Key": KEY + "x"}, "wrong_api_key"),
    ],
    ids=["missing", "wrong", "empty", "prefix", "longer"],
)
def test_v1_routes_refuse_a_missing_or_wrong_key(keyed: TestClient, headers: dict, code: str) -> None:
    for method, path in _v1_calls(keyed):
        response = keyed.request(method, path, headers=headers, json={"model": {"name": "mlp"}})
        assert response.status_code == 401, (method, path, response.text)
        assert response.json()["error"]["code"] == code, (method, path)


def test_v1_routes_accept_the_right_key(keyed: TestClient) -> None:
    for method, path in _v1_calls(keyed):
        response = keyed.request(method, path, headers={"X-API-Key": KEY}, json={"model": {"name": "mlp"}})
        assert response.status_code != 401, (method, path, response.text)
        assert response.status_code < 500, (method, path, response.text)
    created = keyed.post(
        "/v1/recommendations", headers={"X-API-Key": KEY}, json={"model": {"name": "mlp"}, "force": True}
    )
    assert created.status_code == 202
    fetched = keyed.get(f"/v1/recommendations/{created.json()['id']}", headers={"x-api-key": KEY})
    assert fetched.status_code == 200 and fetched.json()["id"] == created.json()["id"]


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"])
def test_health_metrics_and_docs_need_no_key(keyed: TestClient, path: str) -> None:
    assert keyed.get(path).status_code == 200


def test_no_key_configured_means_open(client: TestClient) -> None:
    assert client.get("/v1/models").status_code == 200
    assert client.get("/v1/models", headers={"X-API-Key": "anything"}).status_code == 200


def test_the_schema_documents_the_key(keyed: TestClient) -> None:
    schema = keyed.get("/openapi.json").json()
    assert "APIKeyHeader" in schema["components"]["securitySchemes"]
    assert schema["paths"]["/v1/models"]["get"]["security"] == [{"APIKeyHeader": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]
