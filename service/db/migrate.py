"""Apply Alembic migrations programmatically (used on start-up, by `batchsize migrate` and by tests)."""

from __future__ import annotations

import fcntl
from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, make_url, pool, text

import migrations

# pg_advisory_lock key held while migrating: replicas and workers starting together on one PostgreSQL
# database take turns (the first migrates, the others then find nothing to do).
_MIGRATION_LOCK = 0x62617463  # "batc"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    _locked(database_url, lambda config: command.upgrade(config, revision))


def downgrade(database_url: str, revision: str = "base") -> None:
    _locked(database_url, lambda config: command.downgrade(config, revision))


def _locked(database_url: str, run: Callable[[Config], None]) -> None:
    """Run a migration command under a lock, so that processes starting together take turns: on
    PostgreSQL an advisory lock (on the connection that migrates), on a SQLite file a lock file beside it."""
    config = alembic_config(database_url)
    if database_url.startswith("sqlite"):
        database = make_url(database_url).database
        if not database or database == ":memory:":
            run(config)
            return
        Path(database).parent.mkdir(parents=True, exist_ok=True)
        with open(f"{database}.migrate-lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            run(config)
        return
    if not database_url.startswith("postgresql"):
        run(config)
        return
    engine = create_engine(database_url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK})
            connection.commit()
            try:
                config.attributes["connection"] = connection
                run(config)
                connection.commit()
            finally:
                connection.rollback()
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK})
                connection.commit()
    finally:
        engine.dispose()
