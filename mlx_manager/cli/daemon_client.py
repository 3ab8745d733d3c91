"""Ask the running daemon (found through runtime's daemon.json) to do things: reload its settings,
and the admin calls behind `models ps | load | unload`.

Protocol: `POST {url}/admin/reload` with `Authorization: Bearer <admin token>`; the daemon answers
200 `{"applied": [...], "restart_needed": [...], "error": null}` or a problem document. Other admin
calls go through `admin_call`, which turns a problem document into a DaemonError.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_manager.runtime import admin_token, read_daemon_info


@dataclass(frozen=True)
class ReloadOutcome:
    """What a reload request achieved. `url` is None when no daemon runs."""

    url: str | None
    applied: tuple[str, ...] = ()
    restart_needed: tuple[str, ...] = ()
    error: str | None = None  # set when the daemon did not confirm, or refused the new settings

    @property
    def running(self) -> bool:
        return self.url is not None


def daemon_url() -> str | None:
    """Base URL of the running daemon, or None when none runs."""
    info = read_daemon_info()
    if info is None:
        return None
    return str(info.get("url") or f"http://{info['host']}:{info['port']}").rstrip("/")


def request_reload(timeout: float = 10.0) -> ReloadOutcome:
    """Tell the running daemon to re-read its settings; never raises for network or HTTP errors."""
    url = daemon_url()
    if url is None:
        return ReloadOutcome(url=None)
    import httpx  # only paid for when a daemon actually runs

    token = admin_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        # trust_env=False: a proxy from the environment must not see the admin token or the call.
        with httpx.Client(timeout=timeout, trust_env=False) as client:
            response = client.post(f"{url}/admin/reload", headers=headers)
    except httpx.HTTPError as exc:
        return ReloadOutcome(url=url, error=f"could not reach it ({type(exc).__name__}: {exc or 'no answer'})")
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    if response.status_code != 200:
        detail = body.get("detail") or body.get("title") or response.reason_phrase
        return ReloadOutcome(url=url, error=f"it answered {response.status_code}: {detail}")
    if body.get("error"):
        return ReloadOutcome(url=url, error=f"it kept its old settings: {body['error']}")
    return ReloadOutcome(
        url=url,
        applied=tuple(body.get("applied") or ()),
        restart_needed=tuple(body.get("restart_needed") or ()),
    )


class DaemonError(Exception):
    """An admin call that did not succeed: no daemon, no answer, or a problem document.
    `message` reads as one CLI line; `kind` is the problem's code when the daemon sent one."""

    def __init__(
        self, message: str, *, running: bool = True, status: int | None = None, kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.running = running
        self.status = status
        self.kind = kind


def admin_call(method: str, path: str, body: dict | None = None, timeout: float = 30.0) -> dict:
    """Call an admin endpoint of the running daemon with the admin token; its JSON answer.
    Raises DaemonError (`running=False` when no daemon runs)."""
    url = daemon_url()
    if url is None:
        raise DaemonError("no daemon is running", running=False)
    import httpx

    token = admin_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with httpx.Client(timeout=timeout, trust_env=False) as client:
            response = client.request(method, f"{url}{path}", headers=headers, json=body)
    except httpx.HTTPError as exc:
        raise DaemonError(f"could not reach the daemon at {url} ({type(exc).__name__}: {exc or 'no answer'})") from None
    try:
        answer = response.json()
    except ValueError:
        answer = {}
    if not isinstance(answer, dict):
        answer = {}
    if response.status_code >= 400:
        detail = answer.get("detail") or answer.get("title") or response.reason_phrase
        code = (answer.get("error") or {}).get("code") if isinstance(answer.get("error"), dict) else None
        raise DaemonError(str(detail), status=response.status_code, kind=code)
    return answer
