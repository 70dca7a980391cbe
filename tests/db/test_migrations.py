"""Alembic is the schema's truth: it must build the ORM's schema exactly, and go down cleanly, on SQLite
and on PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from service import repository
from service.db import (
    migrate,
    models,  # noqa: F401
)
from service.db.base import Base
from tests.conftest import BOTH_DATABASES

pytestmark = BOTH_DATABASES


@pytest.fixture
def url(database_url: str | None, tmp_path: Path) -> str:
    return database_url or f"sqlite:///{tmp_path / 'test.db'}"


def test_upgrade_down_and_up_again_on_an_empty_database(url: str) -> None:
    migrate.upgrade(url)
    engine = create_engine(url)
    assert {"recommendations", "trials", "artifacts", "workers", "alembic_version"} <= set(
        inspect(engine).get_table_names()
    )

    migrate.downgrade(url, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}

    migrate.upgrade(url)
    assert "recommendations" in inspect(engine).get_table_names()
    engine.dispose()


def test_migrations_match_the_orm_models(url: str) -> None:
    migrate.upgrade(url)
    engine = create_engine(url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert differences == []


def test_rows_written_before_the_fleet_migration_survive_it_and_its_downgrade(url: str) -> None:
    migrate.upgrade(url, "0001")
    engine = create_engine(url)
    insert = text(
        "INSERT INTO recommendations (id, fingerprint, status, model_name, request, trials_done, "
        "trials_planned, cancel_requested, attempts, created_at) VALUES ('old', 'f', 'succeeded', 'mlp', "
        """'{"model": {"name": "mlp"}}', 0, 0, false, 1, '2026-01-02 03:04:05+00:00')"""
    )
    with engine.begin() as connection:
        connection.execute(insert)
    migrate.upgrade(url)
    with sessionmaker(engine)() as session:
        old = repository.get_recommendation(session, "old")
        assert old is not None and old.request == {"model": {"name": "mlp"}}
        assert old.allow_extrapolation is False and old.device_type is None
        assert old.created_at.tzinfo is not None and old.created_at.isoformat() == "2026-01-02T03:04:05+00:00"
    migrate.downgrade(url, "0001")
    with engine.connect() as connection:
        assert connection.execute(text("SELECT request FROM recommendations")).scalar() is not None
    engine.dispose()


def test_postgresql_stores_jsonb_and_timezone_aware_timestamps(url: str) -> None:
    if not url.startswith("postgresql"):
        pytest.skip("PostgreSQL column types")
    migrate.upgrade(url)
    engine = create_engine(url)
    with engine.connect() as connection:
        types = dict(
            connection.execute(
                text(
                    "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns "
                    "WHERE table_schema = 'public'"
                )
            ).all()
        )
    engine.dispose()
    for column in ("recommendations.request", "recommendations.result", "trials.detail", "artifacts.meta"):
        assert types[column] == "jsonb", column
    for column in ("recommendations.created_at", "recommendations.heartbeat_at", "workers.heartbeat_at"):
        assert types[column] == "timestamp with time zone", column


def test_active_fingerprints_are_unique_but_finished_ones_may_repeat(url: str) -> None:
    migrate.upgrade(url)
    engine = create_engine(url)
    factory = sessionmaker(engine)

    def add(job_id: str, status: str) -> None:
        with factory.begin() as session:
            job = repository.add_recommendation(
                session, recommendation_id=job_id, fingerprint="f" * 64, model_name="mlp", request={}
            )
            job.status = status

    add("a", "succeeded")
    add("b", "failed")
    add("c", "queued")
    with pytest.raises(IntegrityError):
        add("d", "queued")
    with pytest.raises(IntegrityError):
        add("e", "running")
    engine.dispose()


def test_replicas_starting_together_migrate_once_without_errors(url: str) -> None:
    """Replicas and workers all migrate at start-up: four processes at once must take turns."""
    code = "import sys; from service.db import migrate; migrate.upgrade(sys.argv[1])"
    processes = [
        subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    errors = [process.communicate(timeout=120)[1] for process in processes if process.wait(120) != 0]
    assert errors == []
    engine = create_engine(url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == ["0002"]
    engine.dispose()
