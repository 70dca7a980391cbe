"""Alembic is the schema's truth: it must build the ORM's schema exactly, and go down cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from service import repository
from service.db import (
    migrate,
    models,  # noqa: F401
)
from service.db.base import Base


def test_upgrade_down_and_up_again_on_an_empty_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    migrate.upgrade(url)
    engine = create_engine(url)
    assert {"recommendations", "trials", "artifacts", "alembic_version"} <= set(
        inspect(engine).get_table_names()
    )

    migrate.downgrade(url, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}

    migrate.upgrade(url)
    assert "recommendations" in inspect(engine).get_table_names()
    engine.dispose()


def test_migrations_match_the_orm_models(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'compare.db'}"
    migrate.upgrade(url)
    engine = create_engine(url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert differences == []


def test_active_fingerprints_are_unique_but_finished_ones_may_repeat(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'unique.db'}"
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
