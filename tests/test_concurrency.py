"""Concurrency against a live uvicorn: identical POSTs at once share one job and one probe; readers never
see "database is locked" (or any 5xx) while the worker and other clients write; two API replicas on one
database behave as one service. Each test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from service import repository
from service.app import create_app
from service.config import Settings
from service.db.session import session_scope
from service.probing.spec import ProbeSpec
from service.recommendations import routes as recommendation_routes
from tests.conftest import BOTH_DATABASES
from tests.helpers import make_worker
from tests.live_server import live_server

pytestmark = BOTH_DATABASES

TINY = {"model": {"name": "mlp", "config": {"hidden_dims": [16]}}, "time_budget_s": 5}
CLIENTS = 16
# More than the thread pool's 40 slots: what it takes for requests waiting on SQLite's write lock to
# hold every slot.
BURST = 48


@pytest.fixture
def served(settings: Settings) -> Iterator[tuple[FastAPI, str]]:
    app = create_app(settings, run_worker=False)
    with live_server(app) as url:
        yield app, url


@pytest.fixture
def replicas(settings: Settings, tmp_path: Path) -> Iterator[list[tuple[FastAPI, str]]]:
    """Two `serve --no-worker` replicas sharing one database (each with its own data_dir and caches)."""
    url = settings.resolved_database_url
    first = create_app(settings.model_copy(update={"database_url": url}), run_worker=False)
    second_settings = settings.model_copy(update={"database_url": url, "data_dir": tmp_path / "second"})
    second = create_app(second_settings, run_worker=False)
    with live_server(first) as first_url, live_server(second) as second_url:
        yield [(first, first_url), (second, second_url)]


def _all_at_once(count: int, call: Any) -> list[Any]:
    """Run `call(i)` in `count` threads released together; return the results in order."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(index: int) -> None:
        barrier.wait(10)
        try:
            results[index] = call(index)
        except Exception as exc:  # reported by the assertions below
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_identical_posts_at_once_share_one_job_and_start_one_probe(served: tuple[FastAPI, str]) -> None:
    app, url = served
    with httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=CLIENTS)) as http:
        responses = _all_at_once(CLIENTS, lambda _: http.post("/v1/recommendations", json=TINY))
        assert all(isinstance(r, httpx.Response) for r in responses), responses
        assert {r.status_code for r in responses} == {202}, [r.text for r in responses]
        ids = {r.json()["id"] for r in responses}
        assert len(ids) == 1
        assert http.get("/v1/recommendations").json()["total"] == 1

        probes: list[str] = []

        def counting_probe(spec: ProbeSpec, **_: Any) -> dict:
            probes.append(spec.model_name)
            return {"max_feasible_batch_size": 7}

        worker = make_worker(app, counting_probe)
        while worker.run_next():
            pass
        assert probes == ["mlp"]

        # Once it succeeded, the same request again (many at once) is the cached answer: 200, same id.
        again = _all_at_once(CLIENTS, lambda _: http.post("/v1/recommendations", json=TINY))
        assert {r.status_code for r in again} == {200}
        assert {r.json()["id"] for r in again} == ids
        assert not worker.run_next() and probes == ["mlp"]


def test_readers_never_see_a_locked_database_while_the_worker_writes(served: tuple[FastAPI, str]) -> None:
    app, url = served
    finished = threading.Event()

    def busy_probe(spec: ProbeSpec, *, on_event: Any, **_: Any) -> dict:
        for index in range(150):  # one write transaction per event, as fast as the worker can
            on_event({"event": "phase", "phase": "memory", "trials_planned": 150 - index})
            on_event({"event": "trial", "phase": "memory", "batch_size": index + 1, "outcome": "ok",
                      "peak_bytes": 1000 * (index + 1), "step_time_s": 0.001})  # fmt: skip
        return {"max_feasible_batch_size": 150}

    with httpx.Client(base_url=url, timeout=60) as http:
        job_id = http.post("/v1/recommendations", json=TINY).json()["id"]
        worker = make_worker(app, busy_probe)
        worker_thread = threading.Thread(target=lambda: (worker.run_next(), finished.set()))
        statuses: list[tuple[str, int, str]] = []
        lock = threading.Lock()

        def reader(index: int) -> None:
            paths = [f"/v1/recommendations/{job_id}", f"/v1/recommendations/{job_id}/trials",
                     "/v1/recommendations?limit=5", "/metrics", "/readyz"]  # fmt: skip
            deadline = time.monotonic() + 30
            count = 0
            while (not finished.is_set() or count < 5) and time.monotonic() < deadline:
                path = paths[(index + count) % len(paths)]
                response = http.get(path)
                with lock:
                    statuses.append((path, response.status_code, response.text[:200]))
                count += 1

        def writer(index: int) -> None:  # other clients writing at the same time
            for size in range(3):
                body = {**TINY, "dataset": {"size": 1000 + 10 * index + size}}
                response = http.post("/v1/recommendations", json=body)
                with lock:
                    statuses.append(("POST", response.status_code, response.text[:200]))

        worker_thread.start()
        threads = [threading.Thread(target=reader, args=(i,)) for i in range(6)]
        threads += [threading.Thread(target=writer, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in [*threads, worker_thread]:
            thread.join(60)

        assert finished.is_set()
        bad = [s for s in statuses if s[1] >= 500 or "locked" in s[2]]
        assert not bad, bad[:5]
        assert len(statuses) > 30
        assert {s[1] for s in statuses if s[0] == "POST"} == {202}
        done = http.get(f"/v1/recommendations/{job_id}").json()
        assert done["status"] == "succeeded" and done["progress"]["trials_done"] == 150
        assert len(http.get(f"/v1/recommendations/{job_id}/trials").json()) == 150


def test_a_burst_of_cached_posts_neither_stalls_nor_fails(served: tuple[FastAPI, str]) -> None:
    app, url = served
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
    with httpx.Client(base_url=url, timeout=30, limits=limits) as http:
        job_id = http.post("/v1/recommendations", json=TINY).json()["id"]
        assert make_worker(app, lambda spec, **_: {"max_feasible_batch_size": 7}).run_next()
        responses = _all_at_once(BURST, lambda _: http.post("/v1/recommendations", json=TINY))
    statuses = [r.status_code if isinstance(r, httpx.Response) else repr(r) for r in responses]
    assert statuses == [200] * BURST  # nobody ran into the busy timeout ("database is locked")
    assert {r.json()["id"] for r in responses} == {job_id}


def test_two_replicas_share_in_flight_jobs_and_answers(replicas: list[tuple[FastAPI, str]]) -> None:
    (first, first_url), (_, second_url) = replicas
    clients = [httpx.Client(base_url=url, timeout=60) for url in (first_url, second_url)]
    try:
        responses = _all_at_once(CLIENTS, lambda i: clients[i % 2].post("/v1/recommendations", json=TINY))
        assert {r.status_code for r in responses} == {202}, [r.text for r in responses]
        assert len({r.json()["id"] for r in responses}) == 1  # one job, whichever replica was asked
        job_id = responses[0].json()["id"]
        assert make_worker(first, lambda spec, **_: {"max_feasible_batch_size": 7}).run_next()
        for http in clients:
            again = http.post("/v1/recommendations", json=TINY)
            assert again.status_code == 200 and again.json()["id"] == job_id
            assert http.get(f"/v1/recommendations/{job_id}").json()["status"] == "succeeded"
    finally:
        for http in clients:
            http.close()


def test_a_force_on_one_replica_is_seen_by_the_other_within_the_memo_ttl(
    replicas: list[tuple[FastAPI, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recommendation_routes, "ANSWER_MEMO_TTL_S", 0.3)
    (first, first_url), (_, second_url) = replicas
    with (
        httpx.Client(base_url=first_url, timeout=60) as a,
        httpx.Client(base_url=second_url, timeout=60) as b,
    ):
        old = a.post("/v1/recommendations", json=TINY).json()["id"]
        worker = make_worker(first, lambda spec, **_: {"max_feasible_batch_size": 7})
        assert worker.run_next()
        assert b.post("/v1/recommendations", json=TINY).json()["id"] == old  # B now remembers the answer
        forced = a.post("/v1/recommendations", json={**TINY, "force": True})
        assert forced.status_code == 202 and forced.json()["id"] != old
        assert worker.run_next()
        time.sleep(0.35)  # the memo's TTL: how long B may still answer with the older result
        for http in (a, b):
            answer = http.post("/v1/recommendations", json=TINY)
            assert answer.status_code == 200 and answer.json()["id"] == forced.json()["id"]


def test_a_job_of_a_worker_gone_silent_on_another_host_is_requeued_by_a_replica_smake_worker(
    replicas: list[tuple[FastAPI, str]],
) -> None:
    (first, first_url), (second, _) = replicas
    with httpx.Client(base_url=first_url, timeout=60) as http:
        job_id = http.post("/v1/recommendations", json=TINY).json()["id"]
        with session_scope(first.state.batchsize.writes) as session:
            assert repository.claim_next_queued(session, worker_id="gpu-host-7:4242:0a1b2c3d") is not None
        worker = make_worker(second, lambda spec, **_: {"max_feasible_batch_size": 7})
        assert worker.recover_orphans() == []  # another host's pid cannot be checked from here
        worker.settings = worker.settings.model_copy(update={"stale_after_s": 0.05})
        time.sleep(0.1)
        assert worker.requeue_stale() == [job_id]
        assert worker.run_next()
        done = http.get(f"/v1/recommendations/{job_id}").json()
        assert done["status"] == "succeeded"
        with session_scope(second.state.batchsize.reads) as session:
            assert repository.get_recommendation(session, job_id).attempts == 2
