"""The zoo, the device, health, and the OpenAPI document."""

from __future__ import annotations

import shutil

from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings


def test_models_lists_the_zoo_with_config_schemas(client: TestClient) -> None:
    models = {m["name"]: m for m in client.get("/v1/models").json()}
    assert set(models) == {"mlp", "resnet", "gpt"}
    gpt = models["gpt"]
    assert gpt["input_dtype"] == "int64"
    assert gpt["input_shape"] == [gpt["default_config"]["block_size"]]
    assert set(gpt["config_schema"]["properties"]) == set(gpt["default_config"])
    assert models["resnet"]["supports_gradient_checkpointing"] is True
    assert models["mlp"]["supports_gradient_checkpointing"] is False


def test_device_describes_the_host(client: TestClient) -> None:
    device = client.get("/v1/device").json()
    assert device["type"] == "cpu"
    assert device["count"] >= 1
    assert 0 < device["free_bytes"] <= device["memory_bytes"]


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body.pop("disk_free_bytes") > 0
    assert body == {"status": "ready", "database": True, "writable": True, "worker": None}


def test_readiness_fails_when_the_data_disk_is_nearly_full(settings: Settings) -> None:
    free = shutil.disk_usage(settings.data_dir.parent).free
    low = settings.model_copy(update={"min_free_disk_bytes": free + 2**40})  # more than there is
    with TestClient(create_app(low, run_worker=False)) as client:
        ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["status"] == "not_ready" and ready.json()["writable"] is True


def test_write_routes_document_the_cross_site_403_and_the_storage_503(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path, method in [("/v1/recommendations", "post"), ("/v1/artifacts", "post"),
                         ("/v1/recommendations/{recommendation_id}", "delete")]:  # fmt: skip
        assert {"403", "503"} <= set(paths[path][method]["responses"]), f"{method} {path}"
    assert "403" not in paths["/v1/recommendations"]["get"]["responses"]


def test_every_route_documents_its_errors_and_has_a_summary(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert operation.get("summary"), f"{method} {path} has no summary"
            if path.startswith("/v1"):
                codes = set(operation["responses"])
                assert "401" in codes, f"{method} {path} does not document 401"
                assert "422" in codes or (method == "get" and "{" not in path), f"{method} {path}: 422"
                if "{" in path:
                    assert "404" in codes, f"{method} {path} does not document 404"
    post = schema["paths"]["/v1/recommendations"]["post"]
    assert {"200", "202", "413", "422"} <= set(post["responses"])
