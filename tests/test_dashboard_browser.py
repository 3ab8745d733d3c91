"""The admin dashboard in a real browser (Chromium through Playwright) against a real daemon: the
fast model loaded, two API keys in config.toml, requests made with the official `openai` client.

A screenshot of each page goes to the pytest temp dir (its path is printed) for a person to see.
"""

from __future__ import annotations

import contextlib
import http.server
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomlkit
from typer.testing import CliRunner

from mlx_manager.auth import add_key_entry, key_digest, new_key, now_utc
from mlx_manager.cli import app as cli_app
from mlx_manager.daemon.app import create_app
from mlx_manager.daemon.ratelimit import RateLimiter
from mlx_manager.daemon.run import write_daemon_file
from mlx_manager.engine.config import EngineConfig
from mlx_manager.settings import config_path, load_settings, write_config_text
from tests.browser import chromium, painted_pixels
from tests.daemon_server import LiveServer, RecordingEngine, wait_until

ALICE, BOB = new_key(), new_key()
HELLO = [{"role": "user", "content": "hello"}]
DOM_WAIT_MS = 15_000  # a generous ceiling for a busy machine; the 1 s promise is a benchmark figure


@dataclass
class Dashboard:
    live: LiveServer
    home: Path
    model: str

    @property
    def url(self) -> str:
        return self.live.url + "/admin"


@pytest.fixture(scope="module")
def dashboard_daemon(tmp_path_factory, fast_model):
    """A daemon whose keys (alice, bob) live in its config.toml, as `keys add` leaves them, so a
    reload made from the page keeps them."""
    home = tmp_path_factory.mktemp("dashboard-home")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLX_MANAGER_HOME", str(home))
        document = tomlkit.document()
        for name, key in (("alice", ALICE), ("bob", BOB)):
            add_key_entry(document, name, key_digest(key), now_utc())
        # The tests' models live in temporary folders: requests may load them by path, also after
        # the page's `config set` reloads the settings.
        document["models"] = {"allow_any_path": True}
        write_config_text(document.as_string())
        engine = RecordingEngine(EngineConfig(preload=[fast_model], allow_any_path=True))
        with LiveServer(create_app(load_settings(), engine=engine)) as live:
            assert wait_until(lambda: fast_model in engine.status().loaded, timeout=120)
            write_daemon_file("127.0.0.1", live.port, live.url)  # how `mlx-manager dashboard` finds it
            yield Dashboard(live, home, fast_model)


@pytest.fixture
def daemon(dashboard_daemon, monkeypatch) -> Dashboard:
    """The module's daemon, with this test's MLX_MANAGER_HOME pointed back at its home (the CLI
    and the page's `config set` read and write the config file there), and a fresh allowance of
    sign-in attempts: the module's tests sign in more than LOGIN_ATTEMPTS_PER_MINUTE times, in
    under a minute on a fast machine (test_dashboard_access.py tests the limit itself)."""
    monkeypatch.setenv("MLX_MANAGER_HOME", str(dashboard_daemon.home))
    dashboard_daemon.live.app.state.dashboard.logins = RateLimiter()
    return dashboard_daemon


@pytest.fixture(scope="module")
def browser():
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dashboard-screenshots")
    print(f"\ndashboard screenshots: {folder}")
    return folder


@pytest.fixture
def page(browser):
    """A fresh browser profile (no cookies) and a page in it; page errors fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.set_default_timeout(DOM_WAIT_MS)
    yield page
    context.close()
    assert not errors, errors


def sign_in(page, daemon: Dashboard, key: str = ALICE) -> None:
    page.goto(daemon.url)
    page.fill("#login-key", key)
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#live:not([hidden])")


def admin_link(daemon: Dashboard) -> str:
    """What `mlx-manager dashboard` prints: the URL with a one-time sign-in link."""
    result = CliRunner().invoke(cli_app, ["dashboard"])
    assert result.exit_code == 0, result.stderr
    url = result.stdout.strip()
    assert url.startswith(daemon.url + "#login="), url
    return url


def chat(daemon: Dashboard, key: str = ALICE) -> str:
    request_id = f"dash-{uuid.uuid4().hex[:12]}"
    daemon.live.openai(api_key=key).chat.completions.create(
        model=daemon.model, messages=HELLO, max_tokens=3, extra_headers={"X-Request-ID": request_id}
    )
    return request_id


def test_without_a_key_the_page_shows_the_sign_in_form_and_no_data(daemon, page, screenshots):
    chat(daemon)  # there is data to leak
    answers = []
    page.on("response", lambda response: answers.append((response.url, response.status)))
    page.goto(daemon.url)
    page.wait_for_selector("#login-key")
    assert page.is_visible("#login-form")
    for hidden in ("#tabs", "#live", "#charts", "#state", "#settings", "#who"):
        assert page.is_hidden(hidden), hidden
    assert page.locator("#feed tbody tr").count() == 0
    text = page.content()
    assert daemon.model not in text and "alice" not in text and "/v1/chat/completions" not in text
    data_calls = [(url, status) for url, status in answers if "/admin/ui/api/" in url]
    assert data_calls and all(status == 401 for _, status in data_calls), data_calls

    page.fill("#login-key", "mlxm-not-a-key-of-this-daemon-at-all")
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#login-error:text('not valid')")
    assert page.is_hidden("#live")
    page.screenshot(path=screenshots / "sign-in.png", full_page=True)


def test_a_key_signs_in_and_an_openai_request_appears_in_the_live_feed(daemon, page, screenshots):
    sign_in(page, daemon)
    assert page.inner_text("#who-name") == "Signed in with key alice"
    (cookie,) = [c for c in page.context.cookies() if c["name"] == "mlxm_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/admin"
    assert page.evaluate("document.cookie") == ""  # the page's scripts cannot read the session
    page.wait_for_selector("#feed-state:text('Live')")

    request_id = chat(daemon, BOB)
    answered = time.monotonic()
    row = page.wait_for_selector(f'#feed tr[data-request-id="{request_id}"]')
    shown_after = time.monotonic() - answered
    cells = [cell.inner_text() for cell in row.query_selector_all("td")]
    assert cells[1] == "/v1/chat/completions" and cells[2] == daemon.model and cells[3] == "bob"
    assert cells[4].startswith("success") and re.fullmatch(r"\d+ / [1-3]", cells[6]), cells
    print(f"row shown {shown_after * 1000:.0f} ms after the response (ceiling {DOM_WAIT_MS} ms)")

    # Filter and pause, as a person would.
    page.fill("#feed-filter", "bob")
    assert page.locator("#feed tbody tr").count() >= 1
    assert all("bob" in text for text in page.locator("#feed tbody tr td:nth-child(4)").all_inner_texts())
    page.fill("#feed-filter", "")
    page.click("#feed-pause")
    assert page.get_attribute("#feed-pause", "aria-pressed") == "true"
    paused_id = chat(daemon)
    page.wait_for_selector("#feed-state:text('1 new while paused')")
    assert page.locator(f'#feed tr[data-request-id="{paused_id}"]').count() == 0
    page.click("#feed-pause")
    page.wait_for_selector(f'#feed tr[data-request-id="{paused_id}"]')
    page.screenshot(path=screenshots / "live.png", full_page=True)


def test_charts_draw_one_point_per_bucket(daemon, page, screenshots):
    for _ in range(3):
        chat(daemon)
    sign_in(page, daemon)
    page.click("a[href='#charts']")
    chart = page.wait_for_selector("#chart-requests[data-points]")
    assert chart.get_attribute("data-points") == "60"  # the last hour, a point a minute
    for name in ("requests", "tokens", "ttft", "duration", "failures"):
        assert painted_pixels(page, f"#chart-{name} canvas") > 0, name
        assert page.locator(f"#chart-{name} details tbody tr").count() == 60
    cells = page.locator("#chart-requests details tbody tr td:last-child").all_text_contents()
    # The requests just made are in the newest bucket, or the one before if the minute turned since.
    assert sum(float(cell.split()[0]) for cell in cells[-2:]) > 0
    assert page.locator("#by-model tbody tr", has_text=daemon.model).count() == 1
    assert page.locator("#by-key tbody tr", has_text="alice").count() == 1
    page.screenshot(path=screenshots / "charts-hour.png", full_page=True)

    page.check("input[name=window][value=day]")
    page.wait_for_selector("#chart-requests[data-points='96']")  # the last day, a point a quarter hour
    assert painted_pixels(page, "#chart-duration canvas") > 0
    page.screenshot(path=screenshots / "charts-day.png", full_page=True)


def test_editing_timeouts_chat_changes_the_file_and_the_daemon(daemon, page, screenshots):
    page.goto(admin_link(daemon))
    page.wait_for_selector("#who-name:text('admin')")
    assert "login=" not in page.url  # the one-time token left the address bar
    page.click("a[href='#settings']")
    form = page.wait_for_selector("#setting-timeouts-chat form")
    before = daemon.live.daemon.settings.timeouts.chat

    form.query_selector("input").fill("45")
    form.query_selector("button").click()
    page.wait_for_selector("#setting-timeouts-chat-message:text('Saved timeouts.chat = 45')")
    assert tomlkit.parse(config_path().read_text())["timeouts"]["chat"] == 45
    assert daemon.live.daemon.settings.timeouts.chat == 45 != before
    assert daemon.live.daemon.timeout_for("chat") == 45
    written = config_path().read_bytes()

    cli = CliRunner().invoke(cli_app, ["config", "set", "timeouts.chat", "-5"])
    assert cli.exit_code == 2
    cli_message = cli.stderr.strip().removeprefix("Error: ")
    form.query_selector("input").fill("-5")
    form.query_selector("button").click()
    message = page.wait_for_selector("#setting-timeouts-chat-message.error")
    assert message.inner_text() == cli_message
    assert config_path().read_bytes() == written and daemon.live.daemon.settings.timeouts.chat == 45
    page.screenshot(path=screenshots / "settings.png", full_page=True)

    assert CliRunner().invoke(cli_app, ["config", "set", "timeouts.chat", str(before)]).exit_code == 0


def test_the_login_link_works_once(daemon, browser):
    url = admin_link(daemon)
    first = browser.new_context().new_page()
    first.goto(url)
    first.wait_for_selector("#who-name:text('admin')")
    second = browser.new_context().new_page()
    second.goto(url)
    second.wait_for_selector("#login-error:text('used already or has expired')")
    assert second.is_hidden("#live")
    first.context.close()
    second.context.close()


def test_a_key_session_sees_settings_but_cannot_change_them(daemon, page):
    sign_in(page, daemon)
    page.click("a[href='#settings']")
    page.wait_for_selector("#settings-intro:text('read-only')")
    assert page.locator("#setting-timeouts-chat form").count() == 0
    status = page.evaluate(
        """async () => {
            const csrf = (await (await fetch('/admin/ui/api/session')).json()).csrf_token;
            const answer = await fetch('/admin/ui/api/settings', {
                method: 'POST', body: JSON.stringify({key: 'timeouts.chat', value: '30'}),
                headers: {'Content-Type': 'application/json', 'X-CSRF-Token': csrf}});
            return answer.status;
        }"""
    )
    assert status == 403


def test_a_state_changing_call_without_the_csrf_token_is_refused(daemon, page):
    sign_in(page, daemon)
    answer = page.evaluate(
        """async (model) => {
            const answer = await fetch('/admin/ui/api/models/unload', {method: 'POST', body: JSON.stringify({model}),
                headers: {'Content-Type': 'application/json'}});
            return {status: answer.status, body: await answer.json()};
        }""",
        daemon.model,
    )
    assert answer["status"] == 403 and "CSRF" in answer["body"]["detail"]
    assert daemon.model in daemon.live.engine.status().loaded


def test_a_foreign_origin_cannot_open_the_websocket(daemon, page):
    """A page on another port of the same host is the same site: the browser sends it the session
    cookie. The Origin check is what refuses it."""
    sign_in(page, daemon)
    with other_site() as elsewhere:
        page.goto(elsewhere)
        closed = page.evaluate(
            """(url) => new Promise((resolve) => {
                const socket = new WebSocket(url);
                socket.onmessage = () => resolve({code: -1});
                socket.onclose = (event) => resolve({code: event.code, reason: event.reason});
            })""",
            daemon.live.url.replace("http://", "ws://") + "/admin/audit/feed",
        )
    assert closed["code"] == 1008 and "origin" in closed["reason"].lower(), closed


@contextlib.contextmanager
def other_site(content: str = "") -> Iterator[str]:
    """Another web server on this machine (another port of 127.0.0.1): its pages' origin is not the
    daemon's. Its one page holds `content`."""

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f"<!doctype html><title>elsewhere</title><p>another site{content}".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_state_shows_the_loaded_model_and_unloads_it(daemon, page, screenshots):
    sign_in(page, daemon)
    page.click("a[href='#state']")
    page.wait_for_selector(f"#models tbody tr:has-text('{daemon.model}')")
    facts = page.inner_text("#daemon-facts")
    for label in ("Uptime", "Restarts", "BLAS", "Queue depth", "Keep-alive"):
        assert label in facts
    assert page.locator("#cache tbody tr", has_text=daemon.model).count() == 1
    page.screenshot(path=screenshots / "state.png", full_page=True)

    page.click(f"button[aria-label='Unload {daemon.model}']")
    page.wait_for_selector(f"#unload-message:text('Unloaded {daemon.model}.')")
    assert daemon.model not in daemon.live.engine.status().loaded
    page.wait_for_selector("#models-empty:not([hidden])")
    chat(daemon)  # loads it again for whoever comes next
    assert wait_until(lambda: daemon.model in daemon.live.engine.status().loaded)

    rows = wait_until(lambda: audit_rows(daemon, "/admin/ui/api/models/unload"))
    assert rows and rows[-1]["api_key"] == "alice" and rows[-1]["status"] == "success"


def test_keyboard_zoom_and_dark_scheme(daemon, browser, screenshots):
    # 200 % zoom of a 1280-pixel window: a 640-pixel layout viewport at twice the pixel density.
    context = browser.new_context(viewport={"width": 640, "height": 900}, device_scale_factor=2, color_scheme="dark")
    page = context.new_page()
    sign_in(page, daemon)
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(13, 17, 23)"  # the dark scheme's background

    page.reload()  # a fresh load, as a keyboard user arrives: the session cookie signs it in
    page.wait_for_selector("#live:not([hidden])")
    page.keyboard.press("Tab")  # the skip link comes first
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    for _ in range(3):
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.getAttribute('href')") == "#state"
    page.keyboard.press("Enter")
    page.wait_for_selector("#state:not([hidden])")
    assert page.evaluate("document.activeElement.id") == "state-title"  # focus follows to the new page
    page.wait_for_selector("#models tbody tr")
    for name in ("state", "live", "charts", "settings"):
        page.goto(f"{daemon.url}#{name}")
        page.wait_for_selector(f"#{name}:not([hidden])")
        # Nothing wider than the window: wide tables scroll inside their own box.
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), name
        page.screenshot(path=screenshots / f"{name}-zoomed-dark.png")
    context.close()


def audit_rows(daemon: Dashboard, endpoint: str) -> list[dict]:
    with sqlite3.connect(daemon.live.daemon.audit.path) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM audit_logs WHERE endpoint = ? ORDER BY id", (endpoint,))]


def test_offline_every_file_from_the_daemon_and_the_policy_enforced(daemon, browser, screenshots):
    """Whatever the page loads comes from the daemon (anything else is cut off and recorded), so it
    works with no network; the browser enforces the Content-Security-Policy the page is served with."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    elsewhere: list[str] = []

    def only_the_daemon(route) -> None:
        url = route.request.url
        if url.startswith(daemon.live.url + "/") or url.startswith("data:"):
            route.continue_()
        else:
            elsewhere.append(url)
            route.abort()

    context.route("**/*", only_the_daemon)
    page = context.new_page()
    page.set_default_timeout(DOM_WAIT_MS)
    violations: list[str] = []
    page.on(
        "console",
        lambda message: violations.append(message.text) if "Content Security Policy" in message.text else None,
    )
    loaded: list[str] = []
    page.on("requestfinished", lambda request: loaded.append(request.url))
    chat(daemon)
    sign_in(page, daemon)
    page.wait_for_selector("#feed tbody tr")
    page.click("a[href='#charts']")
    page.wait_for_selector("#chart-requests[data-points]")
    assert painted_pixels(page, "#chart-requests canvas") > 0  # the vendored uPlot drew it
    for name in ("state", "settings"):
        page.click(f"a[href='#{name}']")
        page.wait_for_selector(f"#{name}:not([hidden])")
    assert any("/admin/ui/static/vendor/uPlot.iife.min.js" in url for url in loaded), loaded
    assert elsewhere == [] and violations == [], (elsewhere, violations)

    # An injected inline script and a script from another host do not run, and the browser says why.
    blocked = page.evaluate(
        """() => new Promise((resolve) => {
            const seen = [];
            document.addEventListener('securitypolicyviolation', (event) => {
                seen.push(event.violatedDirective);
                if (seen.length === 2) resolve({seen, ran: window.injected === true});
            });
            const inline = document.createElement('script');
            inline.textContent = 'window.injected = true';
            document.body.append(inline);
            const remote = document.createElement('script');
            remote.src = 'https://cdn.example/library.js';
            document.body.append(remote);
        })"""
    )
    assert blocked["ran"] is False and sorted(blocked["seen"]) == ["script-src-elem", "script-src-elem"], blocked
    assert elsewhere == []  # refused by the policy before any request was made
    context.close()


def test_another_origin_cannot_frame_or_drive_the_page(daemon, page, screenshots):
    """A signed-in browser visits another site (another port of this host: the same site, so its
    requests carry the session cookie). It cannot show the dashboard in a frame, and its form post
    and script call to unload the model are refused: the model stays loaded."""
    sign_in(page, daemon)
    unload = daemon.live.url + "/admin/ui/api/models/unload"
    before = len(audit_rows(daemon, "/admin/ui/api/models/unload"))
    with other_site(
        f'<iframe id="framed" src="{daemon.url}" onload="this.dataset.loaded = \'yes\'"></iframe>'
        f'<form method="post" action="{unload}" enctype="text/plain">'
        f'<input type="hidden" name=\'{{"model": "{daemon.model}", "x": "\' value=\'"}}\'>'
        '<button id="submit">Win a prize</button></form>'
    ) as elsewhere:
        page.goto(elsewhere)
        framed = page.frame_locator("#framed")
        page.wait_for_function("document.querySelector('#framed').dataset.loaded === 'yes'")
        assert framed.locator("#login-form, #live").count() == 0  # the browser refused to show it
        assert [frame.url for frame in page.frames[1:]] == ["chrome-error://chromewebdata/"], page.frames
        status = page.evaluate(
            """async ([url, model]) => {
                try {
                    const answer = await fetch(url, {method: 'POST', credentials: 'include', mode: 'no-cors',
                        headers: {'Content-Type': 'text/plain'}, body: JSON.stringify({model})});
                    return answer.type;
                } catch (error) { return String(error); }
            }""",
            [unload, daemon.model],
        )
        assert status == "opaque"  # sent, its answer unreadable to that page
        page.screenshot(path=screenshots / "another-origin.png", full_page=True)
        page.click("#submit")  # a person tricked into pressing the form's button
        page.wait_for_load_state()

    def two_new_rows() -> list[dict] | None:
        rows = audit_rows(daemon, "/admin/ui/api/models/unload")[before:]
        return rows if len(rows) >= 2 else None

    refused = wait_until(two_new_rows)
    assert refused and [row["http_status"] for row in refused] == [403, 403], refused
    assert daemon.model in daemon.live.engine.status().loaded
    assert "dashboard answers only its own pages" in page.content()  # what the tricked person sees
