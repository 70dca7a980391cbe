"""The pages in a real browser: Playwright driving the system Chromium against a live uvicorn server.

Skipped (with the reason) when the `playwright` package or a Chromium binary is missing. CI installs
both: `pip install playwright` and `apt-get install chromium` (no `playwright install`: it downloads).
Screenshots go to $BATCHSIZE_UI_SCREENSHOTS when set (docs/screenshots/ for the README), else to a
temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from service.app import create_app
from service.config import Settings
from service.state import AppState
from tests.live_server import live_server
from tests.ui import seed

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="browser tests need the `playwright` package (pip install playwright)"
)
CHROMIUM = (
    os.environ.get("BATCHSIZE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="browser tests need a Chromium binary (apt-get install chromium)"
)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
BROWSER_KEY = "browser-test-key-0123456789"
TIMEOUT_MS = 15_000
sync_api.expect.set_options(timeout=TIMEOUT_MS)


@dataclass
class Live:
    url: str
    state: AppState

    def post(self, body: dict[str, Any]) -> str:
        response = httpx.post(f"{self.url}/v1/recommendations", json=body, timeout=30)
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.url}{path}", timeout=30)
        assert response.status_code == 200, response.text
        return response.json()


def _serve(tmp_path_factory: pytest.TempPathFactory, **overrides: Any) -> Iterator[Live]:
    """The app under uvicorn on a free loopback port, in a thread, without a worker."""
    data = tmp_path_factory.mktemp("ui-data")
    settings = Settings(data_dir=data, probe_device="cpu", poll_interval_s=0.05, _env_file=None, **overrides)
    app = create_app(settings, run_worker=False)
    with live_server(app) as url:
        yield Live(url=url, state=app.state.batchsize)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    yield from _serve(tmp_path_factory)


@pytest.fixture(scope="module")
def keyed_live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """The same with an API key: pages need a login."""
    yield from _serve(tmp_path_factory, api_key=BROWSER_KEY)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("BATCHSIZE_UI_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Network:
    """Everything that went wrong on the wire, and every request that left the machine (aborted)."""

    failed: list[str] = field(default_factory=list)
    bad_status: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    def assert_clean(self, *, ignore_aborted: bool = False) -> None:
        failed = [f for f in self.failed if not (ignore_aborted and "ERR_ABORTED" in f)]
        assert not self.foreign, f"requests to other hosts: {self.foreign}"
        assert not failed, f"failed requests: {failed}"
        assert not self.bad_status, f"responses >= 400: {self.bad_status}"
        assert not self.page_errors, f"uncaught page errors: {self.page_errors}"


@pytest.fixture
def page(browser: Any) -> Iterator[tuple[Any, Network]]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
    network = Network()

    def only_loopback(route: Any) -> None:
        parts = urlsplit(route.request.url)
        if parts.scheme in ("http", "https", "ws", "wss") and parts.hostname not in LOOPBACK:
            network.foreign.append(route.request.url)
            route.abort()
        else:
            route.continue_()

    context.route("**/*", only_loopback)
    tab = context.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    tab.on("requestfailed", lambda r: network.failed.append(f"{r.url}: {r.failure}"))
    tab.on("response", lambda r: r.status >= 400 and network.bad_status.append(f"{r.status} {r.url}"))
    tab.on("pageerror", lambda error: network.page_errors.append(str(error)))
    try:
        yield tab, network
    finally:
        context.close()


def test_swagger_ui_renders_offline_and_expands_the_post(live: Live, page: tuple, shots: Path) -> None:
    tab, network = page
    tab.goto(f"{live.url}/docs")
    tab.wait_for_selector(".swagger-ui .opblock")
    assert tab.locator("text=Unable to render this definition").count() == 0
    post = tab.locator(".opblock-post", has_text="/v1/recommendations").first
    post.locator(".opblock-summary").click()
    body = post.locator(".opblock-body")
    body.wait_for()
    sync_api.expect(body).to_contain_text("hidden_dims")  # the request example from the schema
    sync_api.expect(body).to_contain_text("202")
    summaries = tab.locator(".opblock-summary-description").all_inner_texts()
    assert summaries and all(text.strip() for text in summaries), "every endpoint has a summary"
    assert any("report" in text.lower() for text in summaries)
    tab.screenshot(path=str(shots / "docs.png"))
    tab.wait_for_load_state("networkidle")
    network.assert_clean()


def test_redoc_renders_offline(live: Live, page: tuple) -> None:
    tab, network = page
    tab.goto(f"{live.url}/redoc")
    sync_api.expect(tab.locator("h1").first).to_contain_text("batchsize-service")
    sync_api.expect(tab.locator("h2", has_text="Ask for a batch size recommendation")).to_be_visible()
    tab.wait_for_selector("img[alt='redocly logo']", state="attached")  # was fetched from a CDN: patched
    tab.wait_for_load_state("networkidle")
    network.assert_clean()


def _number(text: str) -> float:
    return float(text.split()[0])


def test_finished_report_shows_every_plot_and_the_api_numbers(live: Live, page: tuple, shots: Path) -> None:
    tab, network = page
    job = live.post(seed.request(50_000))
    seed.succeeded(live.state, job)
    tab.goto(f"{live.url}/v1/recommendations/{job}/report")
    for name in ("memory", "throughput", "time_to_target", "noise_scale"):
        svg = tab.locator(f'svg[data-plot="{name}"]')
        assert svg.count() == 1, name
        assert svg.get_attribute("data-empty") is None, f"{name} says not measured"
        assert svg.locator("path").count() > 0, name
        box = svg.bounding_box()
        assert box and box["width"] > 300 and box["height"] > 150, name
    for name in ("memory", "throughput", "time_to_target"):
        assert tab.locator(f'svg[data-plot="{name}"] circle').count() > 0, name

    result = live.get(f"/v1/recommendations/{job}")["result"]
    shown = tab.locator("#recipe [data-field]")
    assert shown.count() >= 10
    for i in range(shown.count()):
        cell = shown.nth(i)
        key = cell.get_attribute("data-field")
        expected = result[key]["value"] if key == "gradient_noise_scale" else result[key]
        assert json.loads(cell.get_attribute("data-value")) == expected, key
        if isinstance(expected, int | float) and not isinstance(expected, bool):
            assert _number(cell.inner_text()) == pytest.approx(expected, rel=1e-3), key
    lead = tab.locator('#recipe [data-field="recommended_batch_size"]')
    assert _number(lead.inner_text()) == result["recommended_batch_size"] == 128
    assert tab.locator("#trials tbody tr").count() == len(live.get(f"/v1/recommendations/{job}/trials"))
    assert tab.locator('meta[http-equiv="refresh"]').count() == 0
    tab.screenshot(path=str(shots / "report.png"), full_page=True)
    network.assert_clean()


def test_running_report_follows_the_job_until_it_finishes(live: Live, page: tuple) -> None:
    tab, network = page
    job = live.post(seed.request(40_000))
    seed.claim(live.state, job)
    trials = seed.memory_trials()
    seed.add_trials(live.state, job, trials[:2], phase="memory", trials_planned=6)
    tab.goto(f"{live.url}/v1/recommendations/{job}/report")
    tab.evaluate("window.sameDocument = true")  # gone if the page reloaded
    sync_api.expect(tab.locator("#progress-text")).to_have_text("2 of 6 trials")
    assert tab.locator('svg[data-plot="memory"] circle.point').count() == 2

    seed.add_trials(live.state, job, trials[2:], phase="throughput")
    sync_api.expect(tab.locator("#progress-text")).to_have_text("4 of 6 trials")
    sync_api.expect(tab.locator("#progress-phase")).to_have_text("throughput")

    seed.finish(live.state, job, status="succeeded", result=seed.result())
    sync_api.expect(tab.locator("#status")).to_have_attribute("data-status", "succeeded")
    sync_api.expect(tab.locator('#recipe [data-field="recommended_batch_size"]')).to_contain_text("128")
    assert tab.locator("#progress").count() == 0
    assert tab.locator('svg[data-plot="throughput"] circle').count() > 0  # the final plots swapped in
    assert tab.evaluate("window.sameDocument") is True  # updated in place, never reloaded
    network.assert_clean()


def test_index_lists_jobs_and_its_form_queues_a_request(live: Live, page: tuple, shots: Path) -> None:
    tab, network = page
    failed = live.post(seed.request(30_000, training={"optimizer": "adamw"}))
    seed.claim(live.state, failed)
    seed.add_trials(live.state, failed, [{"phase": "memory", "batch_size": 8, "outcome": "oom"}])
    seed.finish(live.state, failed, status="failed", error_code="oom_at_smallest", error_message="OOM at 8")
    running = live.post(seed.request(20_000, objective="throughput"))
    seed.claim(live.state, running)
    seed.add_trials(live.state, running, seed.memory_trials()[:2], phase="memory", trials_planned=5)
    tab.goto(f"{live.url}/")
    rows = tab.locator("#recent tbody tr")
    assert rows.count() >= 1
    sync_api.expect(tab.locator(f'#recent tr[data-id="{failed}"]')).to_contain_text("failed")
    sync_api.expect(tab.locator(f'#recent tr[data-id="{running}"]')).to_contain_text("memory 2/5")
    tab.screenshot(path=str(shots / "index.png"), full_page=True)

    tab.select_option("#model", "mlp")
    tab.fill("#dataset_size", "12345")
    tab.fill("#budget_mib", "128")
    tab.select_option("#optimizer", "adam")
    tab.select_option("#objective", "throughput")
    tab.fill("#reference_batch_size", "64")
    tab.select_option("#precision", "bf16")
    tab.fill("#time_budget_s", "30")
    tab.fill("#config", '{"hidden_dims": [32]}')
    tab.click("#submit")
    tab.wait_for_url("**/report")
    job = tab.url.rstrip("/").split("/")[-2]
    try:
        stored = live.get(f"/v1/recommendations/{job}")
        assert stored["request"]["dataset"]["size"] == 12345
        assert stored["request"]["memory_budget_bytes"] == 128 * 2**20
        assert stored["request"]["training"]["optimizer"] == "adam"
        assert stored["request"]["objective"] == "throughput"
        assert stored["request"]["training"]["reference_batch_size"] == 64
        assert stored["request"]["training"]["precision"] == "bf16"
        assert stored["request"]["time_budget_s"] == 30
        assert stored["request"]["model"]["config"]["hidden_dims"] == [32]
        sync_api.expect(tab.locator("#status")).to_have_attribute("data-status", "queued")
    finally:  # leave no queued job behind for other tests' seeding
        httpx.delete(f"{live.url}/v1/recommendations/{job}", timeout=30)
    network.assert_clean(ignore_aborted=True)


def test_form_shows_the_api_error(live: Live, page: tuple) -> None:
    tab, network = page
    tab.goto(f"{live.url}/")
    tab.select_option("#model", "gpt")
    tab.fill("#budget_mib", "0.001")  # smaller than the model's weights: a 422 from the API
    tab.click("#submit")
    sync_api.expect(tab.locator("#form-error")).to_contain_text("memory_budget_bytes")
    assert tab.url.rstrip("/") == live.url
    assert network.bad_status and all(entry.startswith("422 ") for entry in network.bad_status)


def test_index_rows_follow_their_jobs_in_place_and_cancel(live: Live, page: tuple) -> None:
    tab, network = page
    running = live.post(seed.request(11_111))
    seed.claim(live.state, running)
    seed.add_trials(live.state, running, seed.memory_trials()[:1], phase="memory", trials_planned=4)
    queued = live.post(seed.request(22_222))
    tab.goto(f"{live.url}/")
    tab.evaluate("window.sameDocument = true")
    row = tab.locator(f'#recent tr[data-id="{running}"]')
    sync_api.expect(row).to_contain_text("memory 1/4")
    seed.add_trials(live.state, running, seed.memory_trials()[1:3], phase="memory")
    sync_api.expect(row).to_contain_text("memory 3/4")
    seed.finish(live.state, running, status="succeeded", result=seed.result())
    sync_api.expect(row.locator(".status")).to_have_text("succeeded")
    sync_api.expect(row.locator(".recommended")).to_have_text("128")
    assert row.locator("button.cancel").count() == 0

    waiting = tab.locator(f'#recent tr[data-id="{queued}"]')
    waiting.locator("button.cancel").click()
    sync_api.expect(waiting.locator(".status")).to_have_text("cancelled")
    assert live.get(f"/v1/recommendations/{queued}")["status"] == "cancelled"
    id_cell = waiting.locator("td.id").bounding_box()
    table = tab.locator("#recent").bounding_box()
    assert id_cell and table and id_cell["x"] + id_cell["width"] <= table["x"] + table["width"] + 1
    assert tab.evaluate("window.sameDocument") is True
    network.assert_clean()


def test_login_with_the_key_then_use_the_pages_and_log_out(keyed_live: Live, page: tuple) -> None:
    tab, network = page
    tab.goto(f"{keyed_live.url}/")
    tab.wait_for_url("**/login?next=/")
    tab.fill("#api_key", "not the key")
    tab.click("#login")
    sync_api.expect(tab.locator("#login-error")).to_contain_text("not the service")
    tab.fill("#api_key", BROWSER_KEY)
    tab.click("#login")
    tab.wait_for_url(f"{keyed_live.url}/")
    cookie = next(c for c in tab.context.cookies() if c["name"] == "batchsize_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert tab.evaluate("document.cookie") == ""  # HttpOnly: scripts cannot read it

    tab.select_option("#model", "mlp")
    tab.fill("#dataset_size", "4321")
    tab.click("#submit")  # the form's fetch carries the session cookie
    tab.wait_for_url("**/report")
    job = tab.url.rstrip("/").split("/")[-2]
    sync_api.expect(tab.locator("#status")).to_have_attribute("data-status", "queued")
    tab.click("#cancel")
    sync_api.expect(tab.locator("#status")).to_have_attribute("data-status", "cancelled")
    headers = {"X-API-Key": BROWSER_KEY}
    assert (
        httpx.get(f"{keyed_live.url}/v1/recommendations/{job}", headers=headers).json()["status"]
        == "cancelled"
    )

    tab.click("#logout")
    tab.wait_for_url("**/login")
    tab.goto(f"{keyed_live.url}/")
    tab.wait_for_url("**/login?next=/")
    network.bad_status = [s for s in network.bad_status if not s.startswith("401 ")]  # the wrong key
    network.assert_clean()
