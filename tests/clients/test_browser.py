"""The browser client and the account page in a real Chromium (Debian's, driven by Playwright) against a real
issuer process.

Every wait polls for a condition with a bound (Playwright's ``wait_for_*`` and ``expect``); nothing sleeps a
fixed time and then asserts. Refresh requests are counted on the wire: every request the browser context
makes (all its tabs) passes through ``Wire``.

Origins: the issuer is ``http://localhost:P1`` (the account page is same-origin with it); the SPA test page
is served on ``http://localhost:P2`` (same site, another origin: listed in ALLOWED_ORIGINS) and on
``http://127.0.0.1:P2`` (another site: listed too, so CORS lets it through and only the cookie rule
remains). Both hosts are secure contexts for Chromium, so the Web Locks API is there, and Chromium keeps
``Secure`` cookies from http://localhost; the issuer runs with its production cookie settings.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, Request, expect, sync_playwright

from tests.clients.browser_support import (
    CHROMIUM_ARGS,
    REPO,
    Issuer,
    browser_database,
    chromium_path,
    running_issuer,
    spa_server,
)

PASSWORD = "correct horse battery"
SCREENSHOTS = REPO / "docs" / "screenshots"
TIMEOUT_MS = 15_000  # a bound on waits for things that must happen, not a measurement


@pytest.fixture(autouse=True)
def _clean_database() -> None:
    """Replaces the suite's (async) one: these tests have their own database, and Playwright's sync API keeps
    an event loop running in this thread, in which no other loop may run."""


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    chromium = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def spa_port() -> Iterator[int]:
    with spa_server({"/readme": _readme_snippet()}) as port:
        yield port


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with browser_database() as url:
        yield url


def _start(database: str, tmp: Path, spa_port: int, **env: str) -> Any:
    origins = f"http://localhost:{spa_port},http://127.0.0.1:{spa_port}"
    return running_issuer(database, tmp, {"ALLOWED_ORIGINS": origins, **env})


@pytest.fixture(scope="module")
def issuer(database: str, spa_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Issuer]:
    with _start(database, tmp_path_factory.mktemp("issuer"), spa_port) as running:
        yield running


class Wire:
    """Every request of one browser context (all its tabs), as (method, path) pairs."""

    def __init__(self, context: BrowserContext) -> None:
        self.requests: list[tuple[str, str]] = []
        context.on("request", self._seen)

    def _seen(self, request: Request) -> None:
        self.requests.append((request.method, httpx.URL(request.url).path))

    def refreshes(self) -> int:
        return self.requests.count(("POST", "/auth/refresh"))


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context()
    ctx.set_default_timeout(TIMEOUT_MS)
    yield ctx
    ctx.close()


def _email() -> str:
    return f"user-{secrets.token_hex(6)}@example.com"


def _register(issuer: Issuer, email: str) -> None:
    response = httpx.post(f"{issuer.url}/auth/register", json={"email": email, "password": PASSWORD}, timeout=10)
    assert response.status_code == 201, response.text


def _spa(context: BrowserContext, issuer: Issuer, origin: str) -> Page:
    page = context.new_page()
    page.goto(f"{origin}/?issuer={issuer.url}")
    page.wait_for_function("window.ready === true")
    return page


def _account(context: BrowserContext, issuer: Issuer) -> Page:
    page = context.new_page()
    page.goto(f"{issuer.url}/account")
    expect(page.locator("#status")).not_to_have_text("Loading…")
    return page


def _sign_in(page: Page, email: str) -> None:
    page.fill("#sign-in input[name=email]", email)
    page.fill("#sign-in input[name=password]", PASSWORD)
    page.click("#sign-in button")
    expect(page.locator("#status")).to_have_text(f"Signed in as {email}.")


def _csp_violations(page: Page) -> list[str]:
    found: list[str] = []
    page.on(
        "console", lambda message: found.append(message.text) if "Content Security Policy" in message.text else None
    )
    return found


def test_account_page_whole_flow(context: BrowserContext, browser: Browser, issuer: Issuer) -> None:
    """Sign up, who am I, sessions with revoke buttons, revoke another device, sign out, sign in, sign out
    everywhere; under the page's CSP with no violation."""
    email = _email()
    page = context.new_page()
    violations = _csp_violations(page)
    page.goto(f"{issuer.url}/account")
    expect(page.locator("#status")).to_have_text("Not signed in.")
    expect(page.locator("#signed-out")).to_be_visible()
    _screenshot(page, "account-signed-out.png")

    page.fill("#sign-up input[name=email]", email)
    page.fill("#sign-up input[name=password]", PASSWORD)
    page.click("#sign-up button")
    expect(page.locator("#status")).to_have_text(f"Signed in as {email}.")
    expect(page.locator("#me-email")).to_have_text(email)
    expect(page.locator("#me-role")).to_have_text("user")
    expect(page.locator("#me-version")).to_have_text("0")
    expect(page.locator("#sessions tbody tr")).to_have_count(1)
    expect(page.locator("#sessions tbody tr.current")).to_have_count(1)

    # A second device signs in: the first sees it, with a revoke button, and revokes it.
    other = browser.new_context()
    try:
        _sign_in(_account(other, issuer), email)
        page.click("#reload")
        expect(page.locator("#sessions tbody tr")).to_have_count(2)
        _screenshot(page, "account-signed-in.png")
        page.locator("#sessions tbody tr:not(.current) button.revoke").click()
        expect(page.locator("#sessions tbody tr")).to_have_count(1)
    finally:
        other.close()

    page.click("#sign-out")
    expect(page.locator("#status")).to_have_text("Signed out.")
    expect(page.locator("#signed-out")).to_be_visible()
    page.reload()
    expect(page.locator("#status")).to_have_text("Not signed in.")  # the cookie is gone too

    page.fill("#sign-in input[name=email]", email)
    page.fill("#sign-in input[name=password]", "wrong password")
    page.click("#sign-in button")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#status")).to_have_text("Not signed in.")

    _sign_in(page, email)
    page.click("#sign-out-everywhere")
    expect(page.locator("#status")).to_have_text("Signed out.")
    page.reload()
    expect(page.locator("#status")).to_have_text("Not signed in.")
    assert violations == []


def _screenshot(page: Page, name: str) -> None:
    """Kept in docs/screenshots/ (shown in the README) when UPDATE_SCREENSHOTS is set; never in a plain run,
    which would rewrite tracked files."""
    if os.environ.get("UPDATE_SCREENSHOTS"):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / name), full_page=True)


def test_reload_restores_the_session_from_the_cookie_alone(
    context: BrowserContext, issuer: Issuer, spa_port: int
) -> None:
    email = _email()
    _register(issuer, email)
    page = _spa(context, issuer, f"http://localhost:{spa_port}")
    page.evaluate("([email, password]) => auth.login(email, password)", [email, PASSWORD])
    page.reload()
    page.wait_for_function("window.ready === true")
    wire = Wire(context)
    user = page.evaluate("() => auth.init()")
    assert user["email"] == email
    assert wire.refreshes() == 1
    me = page.evaluate("async () => (await auth.fetch(new URL('auth/me', auth.issuer))).json()")
    assert me["email"] == email


def test_two_tabs_restoring_at_once_send_one_refresh(context: BrowserContext, issuer: Issuer, spa_port: int) -> None:
    """Two tabs (a reload of both) ask for a session at the same moment: one refresh on the wire, and the
    other tab adopts its token over the BroadcastChannel."""
    email = _email()
    _register(issuer, email)
    origin = f"http://localhost:{spa_port}"
    first = _spa(context, issuer, origin)
    first.evaluate("([email, password]) => auth.login(email, password)", [email, PASSWORD])
    first.reload()
    second = _spa(context, issuer, origin)
    first.wait_for_function("window.ready === true")
    wire = Wire(context)
    # Both start at the same instant of the browser's one clock, a moment from now.
    at = first.evaluate("() => Date.now() + 300")
    start = "(at) => { window.started = new Promise((ok) => setTimeout(ok, at - Date.now())).then(() => auth.init()); }"
    first.evaluate(start, at)
    second.evaluate(start, at)
    users = [tab.evaluate("async () => (await window.started)?.email") for tab in (first, second)]
    assert users == [email, email]
    tokens = {tab.evaluate("() => auth.getAccessToken()") for tab in (first, second)}
    assert len(tokens) == 1
    assert wire.refreshes() == 1


def test_sign_out_in_one_tab_signs_out_the_other_within_a_second(context: BrowserContext, issuer: Issuer) -> None:
    email = _email()
    _register(issuer, email)
    first = _account(context, issuer)
    _sign_in(first, email)
    second = _account(context, issuer)
    expect(second.locator("#status")).to_have_text(f"Signed in as {email}.")
    first.click("#sign-out")
    expect(second.locator("#status")).to_have_text("Signed out.", timeout=1000)


def test_sign_out_everywhere_reaches_every_tab(context: BrowserContext, issuer: Issuer) -> None:
    email = _email()
    _register(issuer, email)
    first = _account(context, issuer)
    _sign_in(first, email)
    second = _account(context, issuer)
    expect(second.locator("#status")).to_have_text(f"Signed in as {email}.")
    second.click("#sign-out-everywhere")
    expect(first.locator("#status")).to_have_text("Signed out.", timeout=1000)


def test_a_session_revoked_from_another_device_ends_at_that_devices_next_call(
    context: BrowserContext, browser: Browser, issuer: Issuer
) -> None:
    email = _email()
    _register(issuer, email)
    device = _account(context, issuer)
    _sign_in(device, email)
    other_tab = _account(context, issuer)
    expect(other_tab.locator("#status")).to_have_text(f"Signed in as {email}.")
    laptop = browser.new_context()
    try:
        remote = _account(laptop, issuer)
        _sign_in(remote, email)
        remote.locator("#sessions tbody tr:not(.current) button.revoke").click()
        expect(remote.locator("#sessions tbody tr")).to_have_count(1)
    finally:
        laptop.close()
    # The device's next call finds its session gone: it ends, in every tab of that browser.
    device.click("#reload")
    expect(device.locator("#status")).to_have_text("Your session has ended. Sign in again.")
    expect(other_tab.locator("#status")).to_have_text("Your session has ended. Sign in again.", timeout=1000)
    device.reload()
    expect(device.locator("#status")).to_have_text("Not signed in.")


def test_the_access_token_is_never_stored(context: BrowserContext, issuer: Issuer, spa_port: int) -> None:
    email = _email()
    _register(issuer, email)
    page = _spa(context, issuer, f"http://localhost:{spa_port}")
    page.evaluate("([email, password]) => auth.login(email, password)", [email, PASSWORD])
    token = page.evaluate("() => auth.getAccessToken()")
    assert token.count(".") == 2
    account = _account(context, issuer)
    expect(account.locator("#status")).to_have_text(f"Signed in as {email}.")
    for tab in (page, account):
        stored = tab.evaluate(DUMP_STORAGE)
        assert token not in stored
        assert token.split(".")[1] not in stored  # nor its claims, in any encoding we would use
    assert all(token not in cookie["value"] for cookie in context.cookies())


# Everything a script on the page can reach in storage, as one string.
DUMP_STORAGE = """async () => {
  const parts = [document.cookie, JSON.stringify({ ...localStorage }), JSON.stringify({ ...sessionStorage })];
  for (const info of await indexedDB.databases()) {
    parts.push(info.name);
    const db = await new Promise((ok, fail) => {
      const open = indexedDB.open(info.name);
      open.onsuccess = () => ok(open.result);
      open.onerror = () => fail(open.error);
    });
    for (const store of db.objectStoreNames) {
      const all = await new Promise((ok) => {
        const request = db.transaction(store).objectStore(store).getAll();
        request.onsuccess = () => ok(request.result);
      });
      parts.push(JSON.stringify(all));
    }
    db.close();
  }
  for (const name of await caches.keys()) parts.push(name);
  return parts.join("\\n");
}"""


def test_a_same_site_page_on_another_origin_works(context: BrowserContext, issuer: Issuer, spa_port: int) -> None:
    """http://localhost:P2 -> http://localhost:P1: another origin (CORS, ALLOWED_ORIGINS), the same site (the
    SameSite=Strict cookie is kept and sent)."""
    email = _email()
    _register(issuer, email)
    page = _spa(context, issuer, f"http://localhost:{spa_port}")
    user = page.evaluate("([email, password]) => auth.login(email, password)", [email, PASSWORD])
    assert user["email"] == email
    sessions = page.evaluate("() => auth.sessions()")
    assert [s["current"] for s in sessions] == [True]
    page.reload()
    page.wait_for_function("window.ready === true")
    assert page.evaluate("async () => (await auth.init())?.email") == email
    page.evaluate("() => auth.logout()")
    page.reload()
    page.wait_for_function("window.ready === true")
    assert page.evaluate("() => auth.init()") is None


def test_a_cross_site_page_gets_a_clear_error(context: BrowserContext, issuer: Issuer, spa_port: int) -> None:
    """http://127.0.0.1:P2 -> http://localhost:P1: the origin is allowed, login answers 200, and Chromium drops
    the SameSite=Strict cookie of that cross-site response. login() says so instead of pretending."""
    email = _email()
    _register(issuer, email)
    page = _spa(context, issuer, f"http://127.0.0.1:{spa_port}")
    wire = Wire(context)
    error = page.evaluate(
        """async ([email, password]) => {
             try { await auth.login(email, password); return null; }
             catch (error) { return { code: error.code, message: error.message, user: auth.user }; }
           }""",
        [email, PASSWORD],
    )
    assert ("POST", "/auth/login") in wire.requests
    assert error is not None
    assert error["code"] == "cookie_not_stored"
    assert "same-site" in error["message"]
    assert error["user"] is None
    assert page.evaluate("() => auth.getAccessToken()") is None


def test_fetch_refreshes_once_on_invalid_token_and_retries_once(
    context: BrowserContext, issuer: Issuer, spa_port: int
) -> None:
    """An API answers 401 invalid_token to the first call: one refresh, one retry with the new token."""
    email = _email()
    _register(issuer, email)
    page = _spa(context, issuer, f"http://localhost:{spa_port}")
    page.evaluate("([email, password]) => auth.login(email, password)", [email, PASSWORD])
    seen: list[str | None] = []

    def api(route: Any) -> None:
        seen.append(route.request.headers.get("authorization"))
        if len(seen) == 1:
            route.fulfill(
                status=401,
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"', "Content-Type": "application/json"},
                body='{"error":"invalid_token","error_description":"expired"}',
            )
        else:
            route.fulfill(status=200, body="ok")

    page.route("**/api/thing", api)
    wire = Wire(context)
    status = page.evaluate("async () => (await auth.fetch('/api/thing')).status")
    assert status == 200
    assert wire.refreshes() == 1
    assert len(seen) == 2
    assert seen[0] is not None
    assert seen[0] != seen[1]
    assert seen[1] == f"Bearer {page.evaluate('() => auth.getAccessToken()')}"


def test_a_failed_refresh_is_never_retried_and_ends_the_session(
    context: BrowserContext, browser: Browser, issuer: Issuer, spa_port: int
) -> None:
    """Signed out everywhere from another device: the next call gets 401 invalid_token (tokenVersion), the
    one refresh gets invalid_grant, and the client gives up: sessionExpired, no second refresh, no retry."""
    email = _email()
    _register(issuer, email)
    page = _spa(context, issuer, f"http://localhost:{spa_port}")
    page.evaluate("([email, password]) => auth.login(email, password)", [email, PASSWORD])
    login = httpx.post(
        f"{issuer.url}/auth/login", json={"email": email, "password": PASSWORD, "token_transport": "body"}, timeout=10
    )
    other = login.json()["access_token"]
    assert (
        httpx.post(
            f"{issuer.url}/auth/logout-all", headers={"Authorization": f"Bearer {other}"}, timeout=10
        ).status_code
        == 204
    )
    wire = Wire(context)
    status = page.evaluate("async () => (await auth.fetch(new URL('auth/me', auth.issuer))).status")
    assert status == 401
    assert wire.refreshes() == 1
    assert wire.requests.count(("GET", "/auth/me")) == 1
    assert page.evaluate("() => window.events") == ["signedIn", "sessionExpired"]
    assert page.evaluate("() => auth.getAccessToken()") is None
    assert wire.refreshes() == 1


def test_refresh_backs_off_on_429_as_retry_after_says(context: BrowserContext, issuer: Issuer, spa_port: int) -> None:
    email = _email()
    _register(issuer, email)
    page = _spa(context, issuer, f"http://localhost:{spa_port}")
    page.evaluate("([email, password]) => auth.login(email, password)", [email, PASSWORD])
    page.reload()
    page.wait_for_function("window.ready === true")
    answers: list[int] = []

    def throttled_once(route: Any) -> None:
        if not answers:
            answers.append(429)
            route.fulfill(
                status=429,
                headers={"Retry-After": "1", "Content-Type": "application/json"},
                body='{"error":"too_many_requests","error_description":"slow down"}',
            )
        else:
            answers.append(200)
            route.continue_()

    page.route("**/auth/refresh", throttled_once)
    assert page.evaluate("async () => (await auth.init())?.email") == email
    assert answers == [429, 200]


def test_cors_answers_expose_retry_after_and_www_authenticate(issuer: Issuer, spa_port: int) -> None:
    origin = f"http://localhost:{spa_port}"
    response = httpx.get(f"{issuer.url}/auth/me", headers={"Origin": origin}, timeout=10)
    assert response.status_code == 401
    assert response.headers["access-control-allow-origin"] == origin
    exposed = {name.strip().lower() for name in response.headers["access-control-expose-headers"].split(",")}
    assert {"retry-after", "www-authenticate"} <= exposed


def test_a_cross_origin_page_reads_www_authenticate(context: BrowserContext, issuer: Issuer, spa_port: int) -> None:
    """What the exposed headers are for: the browser lets the page read them on a cross-origin answer."""
    page = _spa(context, issuer, f"http://localhost:{spa_port}")
    header = page.evaluate(
        "async () => (await fetch(new URL('auth/me', auth.issuer), {headers: {Authorization: 'Bearer x'}}))"
        ".headers.get('WWW-Authenticate')"
    )
    assert header is not None
    assert 'error="invalid_token"' in header


@pytest.fixture(scope="module")
def short_lived_issuer(database: str, spa_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Issuer]:
    """Access tokens of 4 s, so that scheduled refreshes happen during a test."""
    env = {"ACCESS_TOKEN_TTL": "4", "CLOCK_LEEWAY": "0"}
    with _start(database, tmp_path_factory.mktemp("short"), spa_port, **env) as running:
        yield running


def test_one_refresh_per_token_lifetime_however_many_tabs(
    context: BrowserContext, short_lived_issuer: Issuer, spa_port: int
) -> None:
    """Three tabs with a 4 s token go through three scheduled refreshes. Each happens once for all of them:
    no refresh token is ever presented twice (the issuer counts a repeat as a grace-window replay, or as
    reuse), and every tab adopts each new token."""
    issuer = short_lived_issuer
    email = _email()
    _register(issuer, email)
    origin = f"http://localhost:{spa_port}"
    tabs = [_spa(context, issuer, origin) for _ in range(3)]
    tabs[0].evaluate("([email, password]) => auth.login(email, password)", [email, PASSWORD])
    for tab in tabs[1:]:
        assert tab.evaluate("async () => (await auth.init())?.email") == email
    wire = Wire(context)
    before = issuer.refreshes()
    record = (
        "() => { window.seen = new Set(); setInterval(async () => window.seen.add(await auth.getAccessToken()), 50); }"
    )
    for tab in tabs:
        tab.evaluate(record)
    for tab in tabs:
        tab.wait_for_function("window.seen.size >= 4", timeout=30_000)
    after = issuer.refreshes()
    assert after["replayed"] == before["replayed"] == 0
    assert after["reuse"] == before["reuse"] == 0
    assert after["invalid_grant"] == before["invalid_grant"]
    assert after["success"] - before["success"] >= 3
    assert wire.refreshes() == after["success"] - before["success"]
    # The tabs went through the same tokens.
    seen = [set(tab.evaluate("() => [...window.seen]")) for tab in tabs]
    assert seen[0] & seen[1] & seen[2]


def _readme_snippet() -> bytes:
    """The page of the README's "In the browser" section."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## In the browser") :]
    start = section.index("```html\n") + len("```html\n")
    return section[start : section.index("```\n", start)].encode()


def test_the_readme_snippet_works(context: BrowserContext, issuer: Issuer, spa_port: int) -> None:
    email = _email()
    _register(issuer, email)
    answers = iter([email, PASSWORD])
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept(next(answers)))
    page.route("https://api.example.com/orders", _answer_api)
    page.goto(f"http://localhost:{spa_port}/readme?issuer={issuer.url}")
    expect(page.locator("#who")).to_have_text("Signed out")
    page.click("#login")
    expect(page.locator("#who")).to_have_text(f"Signed in as {email}")
    with page.expect_request(
        lambda request: request.url.startswith("https://api.example.com/") and request.method == "GET"
    ) as call:
        page.reload()
    expect(page.locator("#who")).to_have_text(f"Signed in as {email}")
    assert (call.value.headers.get("authorization") or "").startswith("Bearer ey")
    page.click("#logout")
    expect(page.locator("#who")).to_have_text("Signed out")


def _answer_api(route: Any) -> None:
    cors = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Headers": "authorization"}
    route.fulfill(status=200, body="[]", headers=cors)


def test_the_account_page_works_where_make_run_serves_it(
    context: BrowserContext, database: str, tmp_path: Path
) -> None:
    """`make run` serves http://127.0.0.1:8000 with the production cookie (Secure): Chromium keeps it there."""
    with running_issuer(database, tmp_path, host="127.0.0.1") as local:
        email = _email()
        _register(local, email)
        page = _account(context, local)
        expect(page.locator("#status")).to_have_text("Not signed in.")
        _sign_in(page, email)
        page.reload()
        expect(page.locator("#status")).to_have_text(f"Signed in as {email}.")
