"""Hostile requests: cross-site writes refused, CORS closed unless configured, hostile bodies get a 4xx."""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from models import MODELS
from service.app import create_app
from service.config import Settings
from service.security import MAX_JSON_DEPTH, cross_site_problem, json_depth, json_text_depth

MLP = {"model": {"name": "mlp", "config": {"hidden_dims": [8]}}, "time_budget_s": 30}
EVIL = "http://evil.example"


def _npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros((4, 64), dtype=np.float32), y=np.zeros(4, dtype=np.int64))
    return buffer.getvalue()


def _error(response) -> dict:
    assert response.headers["content-type"] == "application/json", response.text
    return response.json()["error"]


# --- cross-site requests ---------------------------------------------------------------------------


def test_a_cross_origin_json_post_is_refused_with_a_json_403(client: TestClient) -> None:
    response = client.post("/v1/recommendations", json=MLP, headers={"Origin": EVIL})
    assert response.status_code == 403
    error = _error(response)
    assert error["code"] == "cross_site_request" and EVIL in error["message"]
    assert response.headers["X-Request-ID"]
    assert client.get("/v1/recommendations").json()["total"] == 0  # nothing was queued


def test_a_cross_origin_multipart_upload_is_refused_before_it_is_read(client: TestClient) -> None:
    files = {"file": ("sample.npz", _npz(), "application/octet-stream")}
    for headers in ({"Origin": EVIL}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
        response = client.post("/v1/artifacts", files=files, data={"kind": "sample"}, headers=headers)
        assert response.status_code == 403, headers
        assert _error(response)["code"] == "cross_site_request"
    assert client.get("/v1/artifacts").json() == []


def test_same_origin_and_no_origin_requests_are_accepted(client: TestClient) -> None:
    files = {"file": ("sample.npz", _npz(), "application/octet-stream")}
    same_origin = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}
    assert (
        client.post("/v1/artifacts", files=files, data={"kind": "sample"}, headers=same_origin).status_code
        == 201
    )
    assert (
        client.post("/v1/recommendations", json=MLP, headers={"Origin": "http://testserver"}).status_code
        == 202
    )
    no_origin = client.post("/v1/recommendations", json={**MLP, "time_budget_s": 31})  # curl, pipelines
    assert no_origin.status_code == 202
    # Behind a proxy that rewrites Host, the browser's own Sec-Fetch-Site still vouches for the page.
    proxied = {"Origin": "https://batchsize.example", "Sec-Fetch-Site": "same-origin"}
    assert (
        client.post("/v1/recommendations", json={**MLP, "time_budget_s": 32}, headers=proxied).status_code
        == 202
    )


def test_cancelling_from_another_origin_is_refused_but_reading_is_not(client: TestClient) -> None:
    job = client.post("/v1/recommendations", json=MLP).json()
    refused = client.delete(f"/v1/recommendations/{job['id']}", headers={"Origin": EVIL})
    assert refused.status_code == 403
    read = client.get(f"/v1/recommendations/{job['id']}", headers={"Origin": EVIL})
    assert read.status_code == 200 and "access-control-allow-origin" not in read.headers  # CORS closed
    assert client.get(f"/v1/recommendations/{job['id']}").json()["status"] == "queued"


def test_cors_is_closed_by_default(client: TestClient) -> None:
    preflight = client.options(
        "/v1/recommendations",
        headers={
            "Origin": EVIL,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_configured_origins_get_cors_and_may_post(settings: Settings) -> None:
    allowed = "https://app.example"
    with TestClient(
        create_app(settings.model_copy(update={"cors_origins": [allowed]}), run_worker=False)
    ) as client:
        preflight = client.options(
            "/v1/recommendations",
            headers={"Origin": allowed, "Access-Control-Request-Method": "POST"},
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == allowed
        posted = client.post("/v1/recommendations", json=MLP, headers={"Origin": allowed})
        assert posted.status_code == 202 and posted.headers["access-control-allow-origin"] == allowed
        assert client.post("/v1/recommendations", json=MLP, headers={"Origin": EVIL}).status_code == 403


@pytest.mark.parametrize(
    ("headers", "refused"),
    [
        ({}, False),
        ({b"origin": b"http://localhost:8000", b"host": b"localhost:8000"}, False),
        ({b"origin": b"https://svc.example", b"host": b"svc.example"}, False),  # TLS ended at a proxy
        ({b"origin": b"http://[::1]:8000", b"host": b"[::1]:8000"}, False),
        ({b"origin": b"http://localhost:3000", b"host": b"localhost:8000"}, True),  # another local app
        ({b"origin": b"http://localhost:8000.evil.example", b"host": b"localhost:8000"}, True),
        ({b"origin": b"null", b"host": b"localhost:8000"}, True),
        ({b"origin": b"null", b"host": b"@"}, True),  # neither names a host: not a match
        ({b"origin": b"http://evil.example"}, True),
        ({b"sec-fetch-site": b"same-site"}, True),
        ({b"sec-fetch-site": b"none"}, False),
    ],
)
def test_cross_site_rules(headers: dict[bytes, bytes], refused: bool) -> None:
    assert (cross_site_problem(headers) is not None) is refused


# --- hostile bodies ---------------------------------------------------------------------------------


def _nested_config(depth: int) -> str:
    inner = "1"
    for _ in range(depth):
        inner = '{"a":' + inner + "}"
    return '{"model":{"name":"mlp","config":' + inner + "}}"


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 256, 940])
def test_deeply_nested_model_config_is_a_422(client: TestClient, depth: int) -> None:
    response = client.post(
        "/v1/recommendations", content=_nested_config(depth), headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    error = _error(response)
    assert error["details"][0]["field"] == "model.config" and "nests deeper than" in error["message"]


def test_nesting_beyond_the_json_parser_is_a_400(client: TestClient) -> None:
    response = client.post(
        "/v1/recommendations", content=_nested_config(5000), headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and _error(response)["code"] == "http_400"
    assert "nests deeper than the parser allows" in _error(response)["message"]


@pytest.mark.parametrize(
    ("model", "named"),
    [
        ({"name": "mlp", "config": {"hidden_dims": [2**62]}}, "hidden_dims must all be <= 1048576"),
        ({"name": "mlp", "config": {"input_dim": 2**63}}, "input_dim must be <= 16777216"),
        ({"name": "resnet", "config": {"width": 2**40}}, "width must be <= 4096"),
        ({"name": "gpt", "config": {"n_embd": 2**40}}, "n_embd must be <= 65536"),
        ({"name": "gpt", "config": {"n_layer": 1_000_000}}, "n_layer must be <= 1024"),
        (
            {"name": "gpt", "config": {"n_layer": 1024, "n_embd": 65536, "n_head": 64}},
            "has 52,777,455,845,376 parameters, over the limit of 20,000,000,000",
        ),
    ],
)
@pytest.mark.parametrize("budget", [None, 2**30])
def test_oversized_models_are_a_422_naming_the_limit(
    client: TestClient, model: dict, named: str, budget: int | None
) -> None:
    response = client.post("/v1/recommendations", json={"model": model, "memory_budget_bytes": budget})
    assert response.status_code == 422
    error = _error(response)
    assert error["code"] == "invalid_model_config" and named in error["message"]


def test_the_budget_check_counts_parameters_without_building_the_model(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_build(*_args: object) -> None:
        raise AssertionError("a module was built in the request path")

    monkeypatch.setitem(MODELS, "mlp", dataclasses.replace(MODELS["mlp"], build=no_build))
    body = {
        "model": {"name": "mlp", "config": {"input_dim": 2**24, "hidden_dims": [512]}},
        "memory_budget_bytes": 2**30,
    }
    response = client.post("/v1/recommendations", json=body)  # 8.6e9 parameters: 34 GB of fp32 weights
    assert response.status_code == 422
    assert _error(response)["code"] == "budget_below_model"
    assert str(4 * 3 * (2**24 * 512 + 512 + 512 * 10 + 10)) in _error(response)["message"]


def test_without_a_budget_a_model_larger_than_the_device_is_a_422(client: TestClient) -> None:
    model = {"name": "mlp", "config": {"input_dim": 2**24, "hidden_dims": [512]}}  # 8.6e9 parameters
    device = {"type": "cuda", "memory_bytes": 2**34}
    response = client.post("/v1/recommendations", json={"model": model, "device": device})
    assert response.status_code == 422
    error = _error(response)
    assert error["code"] == "model_exceeds_device" and str(2**34) in error["message"]
    small = {"model": {"name": "mlp"}, "device": device}
    assert client.post("/v1/recommendations", json=small).status_code == 202


@pytest.mark.parametrize("seconds", [1e-320, 0.5, 0, -1])
def test_time_budgets_under_one_second_are_a_422(client: TestClient, seconds: float) -> None:
    response = client.post("/v1/recommendations", json={**MLP, "time_budget_s": seconds})
    assert response.status_code == 422
    assert _error(response)["details"][0]["field"] == "time_budget_s"
    at_the_bound = client.post("/v1/recommendations", json={**MLP, "time_budget_s": 1})
    # 1 s passes the schema's bound; the model's own least budget (probe start-up included) is larger
    assert _error(at_the_bound)["code"] == "time_budget_too_small"
    assert client.post("/v1/recommendations", json={**MLP, "time_budget_s": 3}).status_code == 202


@pytest.mark.parametrize("field", ["input", "target"])
def test_deeply_nested_json_in_an_upload_form_field_is_a_422(client: TestClient, field: str) -> None:
    data = {"kind": "model", "loss": "cross_entropy", field: "[" * 2000 + "]" * 2000}
    response = client.post("/v1/artifacts", files={"file": ("m.pt2", b"PK")}, data=data)
    assert response.status_code == 422
    error = _error(response)
    assert error["code"] == "invalid_model_spec" and f"form field {field} nests deeper" in error["message"]


def _chunks(body: bytes, size: int = 16 * 1024) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def test_an_oversized_chunked_json_body_is_a_413(client: TestClient) -> None:
    body = json.dumps({**MLP, "padding": "x" * 2_000_000}).encode()
    response = client.post(
        "/v1/recommendations", content=_chunks(body), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413 and _error(response)["code"] == "payload_too_large"


def test_an_oversized_chunked_upload_is_a_413(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", probe_device="cpu", max_upload_bytes=1000, _env_file=None)
    boundary = "b0undary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="kind"\r\n\r\nsample\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.npz"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + b"\0" * 300_000
        + f"\r\n--{boundary}--\r\n".encode()
    )
    with TestClient(create_app(settings, run_worker=False)) as client:
        response = client.post(
            "/v1/artifacts",
            content=_chunks(body),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
    assert response.status_code == 413 and _error(response)["code"] == "payload_too_large"


def test_json_depth_counts_without_recursing() -> None:
    assert json_depth(1) == 0 and json_depth({}) == 1 and json_depth({"a": [1, [2]]}) == 3
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert json_depth(deep) == 100_001
    assert json_text_depth('{"a": [1, "[[[", {"b": "\\"]"}]}') == 3
    assert json_text_depth("[" * 100_000) == 100_000
