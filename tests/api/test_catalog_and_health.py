"""The zoo, the device, health, and the OpenAPI document."""

from __future__ import annotations

from fastapi.testclient import TestClient


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
    assert ready.json() == {"status": "ready", "database": True, "worker": None}


def test_every_route_documents_its_errors_and_has_a_summary(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert operation.get("summary"), f"{method} {path} has no summary"
            if path.startswith("/v1"):
                codes = set(operation["responses"])
                assert "401" in codes, f"{method} {path} does not document 401"
                assert "422" in codes or method == "get" and "{" not in path, f"{method} {path}: 422"
                if "{" in path:
                    assert "404" in codes, f"{method} {path} does not document 404"
    post = schema["paths"]["/v1/recommendations"]["post"]
    assert {"200", "202", "413", "422"} <= set(post["responses"])
