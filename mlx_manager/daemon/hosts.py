"""Which Host and Origin headers the daemon answers: its guard against DNS rebinding.

A web page on evil.example can point evil.example at 127.0.0.1 once the page has loaded; the
browser then sends the page's requests to the daemon as same-origin ones, with
`Host: evil.example:PORT`. Checking the Host header ends that: the daemon answers only names it
is known by (loopback names, server.host, server.allowed_hosts) and IP addresses (no DNS, so no
rebinding). An Origin header, sent by browsers, must be the daemon's own origin or one of
server.cors_origins wherever it is checked (the admin WebSocket, which CORS does not cover).
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from starlette.types import Scope

from mlx_manager.daemon.problems import Problem
from mlx_manager.settings import Settings

_NAME = re.compile(r"[a-z0-9_.-]+")
_ANY_ADDRESS = ("0.0.0.0", "::", "")


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def split_host(value: str) -> tuple[str, str | None] | None:
    """(host, port or None) of a Host header value (lower case, no trailing dot); None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):  # an IPv6 literal
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1 :]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
        return host, rest[1:] or None
    host, colon, port = value.rpartition(":")
    if not colon:
        host, port = value, ""
    elif not port.isdigit():
        return None
    host = host.rstrip(".")
    if not host or not _NAME.fullmatch(host):
        return None
    return host, port or None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    return True


def host_allowed(host: str, settings: Settings) -> bool:
    """Whether the daemon answers to `host` (as `split_host` gives it)."""
    if _is_ip(host) or host == "localhost" or host.endswith(".localhost"):
        return True
    configured = settings.server.host.strip("[]").lower().rstrip(".")
    if configured not in _ANY_ADDRESS and host == configured:
        return True
    for allowed in settings.server.allowed_hosts:
        if allowed == "*" or host == allowed or (allowed.startswith("*.") and host.endswith(allowed[1:])):
            return True
    return False


def host_refusal(scope: Scope, settings: Settings) -> Problem | None:
    """A 421 problem for a Host the daemon is not known by, 400 for a malformed one; else None.
    A request without Host (HTTP/1.0) passes: browsers always send one."""
    value = header(scope, b"host")
    if value is None:
        return None
    parts = split_host(value)
    if parts is None:
        return Problem("bad_request", "the Host header is malformed")
    if host_allowed(parts[0], settings):
        return None
    return Problem(
        "misdirected_request",
        f"this daemon does not answer to the host name {parts[0]!r}; if it is one of this machine's names, "
        "add it to server.allowed_hosts (the check keeps web pages from reaching the daemon by DNS rebinding)",
    )


def origin_allowed(scope: Scope, settings: Settings) -> bool:
    """True without an Origin header (not a browser), for the daemon's own origin (the one its
    Host header names) and for an origin in server.cors_origins."""
    origin = header(scope, b"origin")
    if origin is None:
        return True
    origin = origin.strip().rstrip("/")
    if origin in settings.server.cors_origins or "*" in settings.server.cors_origins:
        return True
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    host = header(scope, b"host")
    scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"  # a page's origin, not ws://
    return host is not None and parts.scheme == scheme and parts.netloc.lower() == host.strip().lower()
