"""One definition of the result: the engine's TypedDict and the pydantic model name the same fields, the
OpenAPI schema types every one of them, and reading then writing a result changes nothing."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from batchsize_client import models
from batchsize_client.recipe import Recipe
from service.app import create_app
from service.config import Settings
from service.probing import result as engine_result
from tests.ui import seed

PAIRS = [
    (engine_result.ProbeResult, models.RecommendationResult),
    (engine_result.ThroughputPoint, models.ThroughputPoint),
    (engine_result.TimeToTargetPoint, models.TimeToTargetPoint),
    (engine_result.ThroughputModel, models.ThroughputModel),
    (engine_result.MemoryModel, models.MemoryModel),
    (engine_result.DeviceInfo, models.DeviceInfo),
    (engine_result.TargetDevice, models.TargetDevice),
    (engine_result.NoiseScale, models.NoiseScale),
    (engine_result.Race, models.Race),
    (engine_result.Races, models.Races),
    (engine_result.DataSample, models.DataSample),
    (engine_result.SearchSummary, models.SearchSummary),
    (engine_result.AccumulationCheck, models.AccumulationCheck),
    (engine_result.ProbeInfo, models.ProbeInfo),
]


@pytest.mark.parametrize(("typed_dict", "model"), PAIRS, ids=[m.__name__ for _, m in PAIRS])
def test_engine_typeddict_and_pydantic_model_name_the_same_fields(
    typed_dict: type, model: type[BaseModel]
) -> None:
    assert set(typing.get_type_hints(typed_dict)) == set(model.model_fields)
    assert [name for name, field in model.model_fields.items() if not field.description] == []


def test_every_result_field_is_typed_and_described_in_openapi(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", probe_device="cpu", _env_file=None)
    with TestClient(create_app(settings, run_worker=False)) as client:
        spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    out = schemas["RecommendationOut"]["properties"]
    assert out["request"]["$ref"].endswith("/RecommendationCreate")
    assert {"$ref": "#/components/schemas/RecommendationResult"} in out["result"]["anyOf"]
    result = schemas["RecommendationResult"]
    assert result["additionalProperties"] is True  # newer fields are allowed
    for name, field in result["properties"].items():
        assert field.get("description"), name
        assert "anyOf" in field or "type" in field or "$ref" in field, name
    assert result["properties"]["throughput"]["anyOf"][0]["items"]["$ref"].endswith("/ThroughputPoint")
    operations = {op["operationId"] for path in spec["paths"].values() for op in path.values()}
    assert {
        "create_recommendation",
        "get_recommendation",
        "list_recommendations",
        "upload_artifact",
    } <= operations


def test_reading_and_writing_a_result_keeps_it_as_it_was() -> None:
    stored = seed.result(objective_used="throughput", future_field={"memory": 1.5}, learning_rate_cap=None)
    stored["throughput"][0]["extra"] = 1
    parsed = models.RecommendationResult.model_validate(stored)
    assert parsed.model_dump(mode="json") == stored  # no null added, the unknown fields kept
    assert parsed.memory.per_sample_bytes == seed.MEMORY["per_sample_bytes"]
    assert parsed.model_extra == {"future_field": {"memory": 1.5}, "learning_rate_cap": None}
    recipe = Recipe.from_result(stored, recommendation_id="abc")
    assert (recipe.id, recipe.batch_size, recipe.result) == ("abc", 128, stored)


def test_a_stored_job_that_no_longer_fits_the_schema_is_still_served() -> None:
    from service.schemas import RecommendationOut

    job = {
        "id": "x",
        "status": "succeeded",
        "fingerprint": "f" * 64,
        "progress": {},
        "request": {"model": {"name": "mlp"}, "old_field": 1},
        "result": {"max_feasible_batch_size": "not a number"},
        "created_at": "2026-01-01T00:00:00",
    }
    body = RecommendationOut.model_validate(job).model_dump(mode="json")
    assert body["request"] == job["request"] and body["result"] == job["result"]


def test_the_client_reads_what_it_can_of_a_result_from_a_newer_service() -> None:
    from batchsize_client import BatchsizeError, Job

    changed = seed.result(races="a newer shape", warnings=["w"])
    job = Job.model_validate({"id": "j", "status": "succeeded", "result": changed})
    assert job.result is not None and job.result.recommended_batch_size == 128 and job.result.races is None
    recipe = Recipe.from_job(job)
    assert recipe.micro_batch_size == 128 and recipe.warnings[-1].endswith("changed type): races")
    assert sum("changed type" in w for w in recipe.warnings) == 1
    with pytest.raises(BatchsizeError) as excinfo:
        Recipe.from_result({"max_feasible_batch_size": 7})
    assert excinfo.value.code == "invalid_result"
