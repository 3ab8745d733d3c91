"""Dashboard sessions and one-time login links, in memory (a restart signs everyone out).

A session is made when a browser presents a credential: an API key (a "key" session, named after
the key) or the admin token, or a one-time login link made for the admin token (an "admin"
session). The browser holds only the session's id, in an HttpOnly cookie; the page holds its
CSRF token, which every state-changing call sends back. Only SHA-256 digests of ids, tokens and
links are kept, so a memory dump gives no usable credential.

A session remembers the digest of the credential it came from and is honoured only while that
credential still is (see `DashboardAccess.valid`): revoking a key ends its sessions.

A login link is `mlx-manager dashboard`'s: the CLI (which can read the admin token) asks the
daemon for one; the daemon keeps the link's digest for LINK_SECONDS, and the first presentation
takes it out, valid or late, so a link works once at most.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["admin", "key"]

SESSION_SECONDS = 12 * 3600  # a session ends this long after sign-in, used or not
LINK_SECONDS = 120.0
MAX_SESSIONS = 256  # past this, the oldest session ends: a login loop cannot grow memory
MAX_LINKS = 16


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


@dataclass
class Session:
    name: str  # the key's name, or "admin"
    role: Role
    credential: bytes  # SHA-256 of the key or admin token it was made with
    csrf: str
    expires: float  # on the store's clock

    def csrf_matches(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self.csrf.encode())


@dataclass
class SessionStore:
    clock: Callable[[], float] = time.monotonic
    _sessions: OrderedDict[bytes, Session] = field(default_factory=OrderedDict)
    _links: OrderedDict[bytes, float] = field(default_factory=OrderedDict)

    def start(self, name: str, role: Role, credential: bytes) -> tuple[str, Session]:
        """A new session; returns the id for the cookie (kept here only as its digest)."""
        session_id = secrets.token_urlsafe(32)
        session = Session(name, role, credential, secrets.token_urlsafe(32), self.clock() + SESSION_SECONDS)
        self._sessions[digest(session_id)] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        """The live session with this id, or None (unknown, or expired: then it is forgotten)."""
        if not session_id:
            return None
        key = digest(session_id)
        session = self._sessions.get(key)
        if session is not None and session.expires <= self.clock():
            del self._sessions[key]
            return None
        return session

    def end(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(digest(session_id), None)

    def new_link(self) -> str:
        """A one-time login token, good for LINK_SECONDS."""
        token = secrets.token_urlsafe(32)
        self._links[digest(token)] = self.clock() + LINK_SECONDS
        while len(self._links) > MAX_LINKS:
            self._links.popitem(last=False)
        return token

    def use_link(self, token: str) -> bool:
        """True once for a link made here and presented in time; it is gone after any presentation."""
        expires = self._links.pop(digest(token), None)
        return expires is not None and expires > self.clock()
