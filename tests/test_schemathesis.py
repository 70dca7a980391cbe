"""Hostile input: schemathesis generates valid and invalid requests from the live OpenAPI schema.

Every check runs: no 5xx, only documented status codes, responses that conform to the schema (body,
content type, headers), invalid data rejected, valid data accepted. Bounded and deterministic: a fixed
seed, a few examples per operation, derandomized Hypothesis.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import PositiveDataAcceptanceConfig

from service.app import create_app
from service.config import Settings
from tests.live_server import live_server

MAX_EXAMPLES = 25
API_KEY = "schemathesis-key"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data_dir: Path = tmp_path_factory.mktemp("schemathesis") / "data"
    app_settings = Settings(data_dir=data_dir, probe_device="cpu", api_key=API_KEY, _env_file=None)
    with live_server(create_app(app_settings, run_worker=False)) as url:
        yield url


def _load_schema() -> schemathesis.BaseSchema:
    """The app's OpenAPI document, built without starting it (the live server serves the same one)."""
    config = schemathesis.Config(seed=20240601)
    config.projects.default.generation.update(max_examples=MAX_EXAMPLES, deterministic=True)
    config.projects.default.update(headers={"X-API-Key": API_KEY})  # and checks that without it: 401
    # A schema-valid body can still be refused with a documented 422 (`model.config` that the named zoo
    # model doesn't accept, an input shape that doesn't match it): JSON Schema can't express those rules.
    config.projects.default.checks.positive_data_acceptance = PositiveDataAcceptanceConfig(
        expected_statuses=["2xx", "3xx", 401, 403, 404, 409, 422, 429]
    )
    openapi = create_app(Settings(_env_file=None), run_worker=False).openapi()
    return schemathesis.openapi.from_dict(openapi, config=config)


schema = _load_schema()


def test_the_live_server_serves_the_tested_schema(base_url: str) -> None:
    import httpx

    assert httpx.get(f"{base_url}/openapi.json").json() == schema.raw_schema


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_survives_generated_input(case: schemathesis.Case, base_url: str) -> None:
    case.call_and_validate(base_url=base_url, timeout=30)
