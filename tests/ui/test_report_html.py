"""The report and index pages without a browser: status codes, content, plots, progress, errors."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from service.recipe_text import format_bytes
from service.report.svg import Axis, log2_range, svg_plot
from tests.ui import seed


def _state(client: TestClient):
    return client.app.state.batchsize


def _post(client: TestClient, dataset_size: int = 50_000, **extra) -> str:
    response = client.post("/v1/recommendations", json=seed.request(dataset_size, **extra))
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _plots(html: str) -> dict[str, str]:
    return {m.group(1): m.group(0) for m in re.finditer(r'<svg[^>]*data-plot="(\w+)".*?</svg>', html, re.S)}


def test_finished_report_has_the_recipe_every_plot_and_the_trials(client: TestClient) -> None:
    job = _post(client)
    seed.succeeded(_state(client), job)
    response = client.get(f"/v1/recommendations/{job}/report")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert 'http-equiv="refresh"' not in html
    assert 'data-field="recommended_batch_size" data-value="128"' in html
    assert 'data-field="max_feasible_batch_size" data-value="2043"' in html
    assert 'data-field="learning_rate" data-value="0.4"' in html
    plots = _plots(html)
    assert set(plots) == {"memory", "throughput", "time_to_target", "noise_scale"}
    for name, svg in plots.items():
        assert "not measured" not in svg, name
        assert ("<path" in svg and "<circle" in svg) or (name == "noise_scale" and "<path" in svg), name
    assert "budget 256 MiB" in plots["memory"] and "max feasible 2043" in plots["memory"]
    assert "recommended 128" in plots["time_to_target"]
    assert 'class="band"' in plots["noise_scale"]
    assert html.count("<tr>") == 1 + len(seed.all_trials())  # header + one row per trial
    assert "builtin:digits" in html
    # Self-contained: nothing loaded from elsewhere.
    assert not re.search(r'(src|href)="(https?:)?//', html)


def test_report_without_noise_scale_or_curve_says_not_measured(client: TestClient) -> None:
    job = _post(client)
    body = seed.result(gradient_noise_scale=None)
    del body["time_to_target_curve"]
    seed.succeeded(_state(client), job, body)
    plots = _plots(client.get(f"/v1/recommendations/{job}/report").text)
    assert "not measured" in plots["noise_scale"] and "not measured" in plots["time_to_target"]
    assert "not measured" not in plots["memory"] and "not measured" not in plots["throughput"]


def test_time_curve_is_derived_from_throughput_and_noise_when_absent(client: TestClient) -> None:
    job = _post(client)
    body = seed.result()
    del body["time_to_target_curve"]
    seed.succeeded(_state(client), job, body)
    plots = _plots(client.get(f"/v1/recommendations/{job}/report").text)
    assert "derived here from throughput" in plots["time_to_target"]
    assert "<circle" in plots["time_to_target"]


def test_running_job_shows_progress_and_refreshes(client: TestClient) -> None:
    job = _post(client)
    state = _state(client)
    seed.claim(state, job)
    seed.add_trials(state, job, seed.memory_trials()[:2], phase="memory", trials_planned=6)
    html = client.get(f"/v1/recommendations/{job}/report").text
    assert 'http-equiv="refresh"' not in html  # followed in place by a script, never reloaded
    assert "const id = " in html and 'id="cancel"' in html
    assert 'data-status="running"' in html
    assert "2 of 6 trials" in html and 'id="progress-phase">memory<' in html
    plots = _plots(html)
    assert "<circle" in plots["memory"]  # the trials measured so far are already plotted
    assert "not measured" in plots["throughput"]


def test_queued_job_waits_for_a_worker(client: TestClient) -> None:
    job = _post(client)
    html = client.get(f"/v1/recommendations/{job}/report").text
    assert "Waiting for a worker" in html and "const id = " in html
    assert all("not measured" in svg for svg in _plots(html).values())


def test_failed_job_shows_its_error_and_no_refresh(client: TestClient) -> None:
    job = _post(client)
    state = _state(client)
    seed.claim(state, job)
    seed.add_trials(state, job, [{"phase": "memory", "batch_size": 1, "outcome": "oom"}])
    seed.finish(
        state, job, status="failed", error_code="oom_at_smallest", error_message="OOM at batch size 1"
    )
    response = client.get(f"/v1/recommendations/{job}/report")
    assert response.status_code == 200
    html = response.text
    assert "oom_at_smallest" in html and "OOM at batch size 1" in html
    assert 'http-equiv="refresh"' not in html and "const id = " not in html and 'id="cancel"' not in html
    assert "not measured" in _plots(html)["throughput"]


def test_unknown_id_is_a_404_envelope_and_long_ids_422(client: TestClient) -> None:
    response = client.get("/v1/recommendations/nope/report")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert client.get(f"/v1/recommendations/{'x' * 65}/report").status_code == 422


def test_html_in_stored_values_is_escaped(client: TestClient) -> None:
    job = _post(client)
    seed.succeeded(
        _state(client), job, seed.result(warnings=["<script>alert(1)</script>"], confidence='"><b>')
    )
    html = client.get(f"/v1/recommendations/{job}/report").text
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in html
    assert '"><b>' not in html


def test_report_needs_the_api_key_when_one_is_set(settings) -> None:
    from service.app import create_app

    with TestClient(create_app(settings.model_copy(update={"api_key": "k"}), run_worker=False)) as locked:
        assert locked.get("/v1/recommendations/x/report").status_code == 401  # not a browser: the API's 401
        browser = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
        to_login = locked.get("/v1/recommendations/x/report", headers=browser, follow_redirects=False)
        assert to_login.status_code == 303 and to_login.headers["location"].startswith("/login?next=")
        assert locked.get("/v1/recommendations/x/report", headers={"X-API-Key": "wrong"}).status_code == 401
        assert locked.get("/v1/recommendations/x/report", headers={"X-API-Key": "k"}).status_code == 404
        assert locked.get("/docs").status_code == 200


def test_index_lists_recent_jobs_and_the_zoo(client: TestClient) -> None:
    done = _post(client, 1000)
    seed.succeeded(_state(client), done)
    queued = _post(client, 2000)
    html = client.get("/").text
    assert f'href="/v1/recommendations/{done}/report"' in html
    assert f'href="/v1/recommendations/{queued}/report"' in html
    assert "succeeded" in html and "queued" in html
    for name in ("mlp", "gpt"):
        assert f'<option value="{name}"' in html
    assert re.search(r'<td class="num recommended">128</td>', html)
    # Ids whole (what `batchsize status` takes), queued rows followed in place with a cancel button.
    assert f'<td class="mono id">{done}</td>' in html
    assert f'<tr data-id="{queued}" data-active>' in html and html.count('class="cancel"') == 1
    for field in ("reference_batch_size", "precision", "config", "time_budget_s"):
        assert f'id="{field}"' in html


def test_docs_are_served_from_vendored_assets(client: TestClient) -> None:
    docs = client.get("/docs").text
    redoc = client.get("/redoc").text
    for page in (docs, redoc):
        urls = re.findall(r'(?:src|href)="([^"]+)"', page)
        assert urls and all(url.startswith("/static/") for url in urls), urls
    for path in (
        "/static/swagger-ui/swagger-ui-bundle.js",
        "/static/swagger-ui/swagger-ui.css",
        "/static/swagger-ui/favicon-32x32.png",
        "/static/redoc/redoc.standalone.js",
    ):
        assert client.get(path).status_code == 200, path


def test_report_route_is_documented(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/v1/recommendations/{recommendation_id}/report"]["get"]
    assert operation["summary"]
    assert "text/html" in operation["responses"]["200"]["content"]
    assert {"401", "404", "422"} <= set(operation["responses"])
    assert "/" not in spec["paths"] and "/docs" not in spec["paths"]


def test_plot_helper_axes() -> None:
    axis = Axis(8, 2048, 0, 100, log2=True)
    assert axis(8) == 0 and axis(2048) == 100 and abs(axis(128) - 50) < 1e-9
    assert axis.ticks() == [8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    assert len(Axis(1, 2**20, 0, 100, log2=True).ticks()) <= 9
    assert Axis(0, 1000, 0, 100).ticks() == [0, 200, 400, 600, 800, 1000]
    assert log2_range([3, 100]) == (2, 128) and log2_range([64]) == (64, 128)
    assert format_bytes(256 * 2**20) == "256 MiB" and format_bytes(None) == "—"
    svg = svg_plot(name="t", title="T", x_label="x", y_label="y", x=(1, 8), y=(0, 1))
    assert svg.startswith("<svg") and svg.endswith("</svg>")


def test_a_malformed_result_still_renders(client: TestClient) -> None:
    job = _post(client)
    odd = {
        "recommended_batch_size": "many",
        "throughput": "fast",
        "memory": [1, 2],
        "gradient_noise_scale": {"value": "x", "low": None},
        "time_to_target_curve": [{"batch_size": 0, "relative_time": 1}, None, 3],
        "warnings": [{"code": "w", "message": "a structured warning"}],
    }
    seed.succeeded(_state(client), job, odd)
    response = client.get(f"/v1/recommendations/{job}/report")
    assert response.status_code == 200
    assert "a structured warning" in response.text
    assert set(_plots(response.text)) == {"memory", "throughput", "time_to_target", "noise_scale"}


def test_vendored_redoc_loads_nothing_from_a_cdn() -> None:
    from service.api.ui import STATIC_DIR

    assert "cdn.redoc.ly" not in (STATIC_DIR / "redoc" / "redoc.standalone.js").read_text()
