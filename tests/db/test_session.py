"""The connection pool (service/db/session.py) is sized to the request threads on both databases."""

from __future__ import annotations

import pytest

from service.config import Settings
from service.db.session import POOL_OVERFLOW, make_engine


@pytest.mark.parametrize(
    "url", ["sqlite:///{tmp}/pool.db", "postgresql+psycopg://user:secret@127.0.0.1:1/db"]
)
def test_the_pool_has_a_connection_for_every_request_thread(tmp_path, url: str) -> None:
    # Building an engine opens no connection, so the PostgreSQL URL needs no server.
    settings = Settings(database_url=url.format(tmp=tmp_path), database_pool_size=37)
    engine = make_engine(settings)
    try:
        assert engine.pool.size() == 37
        assert engine.pool._max_overflow == POOL_OVERFLOW  # no public accessor
    finally:
        engine.dispose()


def test_the_default_pool_matches_the_servers_request_threads() -> None:
    import anyio
    from anyio import to_thread

    async def request_threads() -> float:
        return to_thread.current_default_thread_limiter().total_tokens

    assert Settings().database_pool_size == anyio.run(request_threads)
