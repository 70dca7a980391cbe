"""Browser access with an API key: the key once at /login, then an HttpOnly SameSite session cookie."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.deps import SESSION_COOKIE, SESSION_MAX_AGE_S, session_token, session_valid
from service.app import create_app
from service.config import Settings

KEY = "browser-key-0123456789"
BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"  # what a browser accepts


@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path / "data", probe_device="cpu", api_key=KEY, _env_file=None)
    app = create_app(settings, run_worker=False)
    with TestClient(app, follow_redirects=False, headers={"Accept": BROWSER}) as client:
        yield client


def test_pages_send_a_browser_to_login_then_the_cookie_opens_pages_and_api(keyed: TestClient) -> None:
    first = keyed.get("/")
    assert first.status_code == 303 and first.headers["location"] == "/login?next=/"
    report = keyed.get("/v1/recommendations/abc/report")
    assert report.status_code == 303 and report.headers["location"].startswith("/login?next=/v1/")
    assert keyed.get("/v1/models").status_code == 401  # the JSON API answers 401, it never redirects
    assert keyed.get("/", headers={"Accept": "application/json"}).status_code == 401  # nor to programs

    form = keyed.get("/login?next=/")
    assert form.status_code == 200 and 'type="password"' in form.text

    wrong = keyed.post("/login", data={"api_key": "nope", "next": "/"})
    assert wrong.status_code == 401 and "not the service" in wrong.text
    assert SESSION_COOKIE not in wrong.cookies

    ok = keyed.post("/login", data={"api_key": KEY, "next": "/"})
    assert ok.status_code == 303 and ok.headers["location"] == "/"
    cookie = ok.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert KEY not in cookie

    assert keyed.get("/").status_code == 200
    assert "Log out" in keyed.get("/").text
    assert keyed.get("/v1/models").status_code == 200
    posted = keyed.post("/v1/recommendations", json={"model": {"name": "mlp"}})
    assert posted.status_code == 202
    assert keyed.get(f"/v1/recommendations/{posted.json()['id']}/report").status_code == 200
    # a header, when given, is still checked: a wrong one is refused even with a session
    assert keyed.get("/v1/models", headers={"X-API-Key": "wrong"}).status_code == 401

    out = keyed.post("/logout")
    assert out.status_code == 303 and out.headers["location"] == "/login"
    keyed.cookies.clear()  # what the browser does with the expired cookie
    assert keyed.get("/").status_code == 303


def test_login_only_goes_on_to_this_site(keyed: TestClient) -> None:
    for target in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
        response = keyed.post("/login", data={"api_key": KEY, "next": target})
        assert response.status_code == 303 and response.headers["location"] == "/", target


def test_the_api_key_header_still_opens_the_pages(keyed: TestClient) -> None:
    assert keyed.get("/", headers={"X-API-Key": KEY}).status_code == 200
    assert keyed.get("/", headers={"X-API-Key": "wrong"}).status_code == 401


def test_session_tokens_expire_and_belong_to_one_key() -> None:
    now = int(time.time())
    token = session_token(KEY, now)
    assert session_valid(KEY, token, now + 10)
    assert not session_valid(KEY, token, now + SESSION_MAX_AGE_S + 1)
    assert not session_valid("another-key", token, now)
    assert not session_valid(KEY, token[:-1] + ("0" if token[-1] != "0" else "1"), now)
    for junk in (None, "", "abc", "12.", ".abc", "9" * 20 + ".x"):
        assert not session_valid(KEY, junk, now)


def test_without_a_key_there_is_nothing_to_log_in_to(client: TestClient) -> None:
    response = client.get("/login", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/"
    assert client.get("/").status_code == 200
