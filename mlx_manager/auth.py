"""API keys: how they are made, kept and checked, and when the daemon may listen without one.

A key is `mlxm-` and 43 URL-safe characters (256 random bits). The config file keeps only its
SHA-256 under `[[auth.keys]]` (written by `mlx-manager keys`), so a copy of the file does not give
the key away. `auth.keys_file` (a mounted secret, one plain key per line) and the
MLX_MANAGER_API_KEY variable add keys from outside. No heavy imports: the CLI uses this too.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlx_manager.settings import Settings, SettingsError

KEY_PREFIX = "mlxm-"
ENV_KEY = "MLX_MANAGER_API_KEY"
# Keys from a file or the environment are chosen by people: refuse the ones easy to guess.
MIN_PLAIN_KEY_LENGTH = 16
ADD_KEY_HINT = "Add a key with `mlx-manager keys add NAME`"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_digest(key: str) -> str:
    """The hex SHA-256 the config file keeps instead of the key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class KeyRing:
    """Every key the daemon accepts, as (name, SHA-256 digest); empty means the API is open."""

    entries: tuple[tuple[str, bytes], ...] = ()

    def __len__(self) -> int:
        return len(self.entries)

    def match(self, presented: str) -> str | None:
        """The name of the key `presented` is, or None. Every entry is compared, each in constant
        time, so the time taken says nothing about which key (or how much of one) matched."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found = None
        for name, stored in self.entries:
            if hmac.compare_digest(digest, stored) and found is None:
                found = name
        return found


def load_keyring(settings: Settings) -> KeyRing:
    """The keys from the config file, `auth.keys_file` and MLX_MANAGER_API_KEY. Raises SettingsError
    when a configured source cannot be used: a daemon must not quietly run open instead."""
    entries = [(key.name, bytes.fromhex(key.sha256)) for key in settings.auth.keys]
    if settings.auth.keys_file:
        for number, key in read_keys_file(Path(settings.auth.keys_file).expanduser()):
            entries.append((f"keys_file:{number}", hashlib.sha256(key.encode()).digest()))
    env = os.environ.get(ENV_KEY, "").strip()
    if env:
        _check_plain(env, source=ENV_KEY)
        entries.append((ENV_KEY, hashlib.sha256(env.encode()).digest()))
    return KeyRing(tuple(entries))


def read_keys_file(path: Path) -> list[tuple[int, str]]:
    """(line number, key) for each key in a plain keys file; blank lines and # comments are skipped."""
    source = "auth.keys_file"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise SettingsError(key=source, problem=f"cannot read {path} ({reason})") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        key = line.strip()
        if key and not key.startswith("#"):
            _check_plain(key, source=f"{path}:{number}")
            keys.append((number, key))
    if not keys:
        raise SettingsError(key=source, problem=f"{path} holds no key (one per line)")
    return keys


def _check_plain(key: str, *, source: str) -> None:
    if len(key) < MIN_PLAIN_KEY_LENGTH or any(ch.isspace() for ch in key):
        raise SettingsError(
            source=source,
            problem=f"an API key must be at least {MIN_PLAIN_KEY_LENGTH} characters without spaces "
            "(`mlx-manager keys add NAME` makes a strong one)",
        )


def bearer_token(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, or None."""
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


# -- bind safety ----------------------------------------------------------------------------------


def is_loopback_host(host: str) -> bool:
    """True when every address `host` stands for is on this machine only (127.0.0.0/8, ::1)."""
    name = host.strip("[]")
    try:
        ipaddress.ip_address(name.split("%")[0])
        return is_loopback_address(name)
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)}
    except (OSError, UnicodeError):
        return name == "localhost"
    return bool(addresses) and all(is_loopback_address(str(a)) for a in addresses)


def is_loopback_address(address: str | None) -> bool:
    """True for a literal loopback IP (127.0.0.0/8, ::1, ::ffff:127.x.x.x). Never resolves a name:
    a client's address is checked as it came in."""
    try:
        ip = ipaddress.ip_address((address or "").strip("[]").split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def unsafe_bind(host: str, keyring: KeyRing, insecure_no_auth: bool) -> str | None:
    """Why listening on `host` is refused (a network address and no API key), or None."""
    if keyring or insecure_no_auth or is_loopback_host(host):
        return None
    return (
        f"refusing to listen on {host} without an API key: anyone who can reach it could use the API. "
        f"{ADD_KEY_HINT}, or pass --insecure-no-auth to allow it anyway."
    )


# -- the [[auth.keys]] entries of a config document (tomlkit) ----------------------------------------


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def add_key_entry(document: Any, name: str, digest: str, created: datetime) -> None:
    """Append one `[[auth.keys]]` entry, creating the table if needed; comments elsewhere are kept."""
    import tomlkit

    if "auth" not in document:
        document.add("auth", tomlkit.table(is_super_table=True))  # no bare [auth] header
    auth = document["auth"]
    if "keys" not in auth:
        auth.append("keys", tomlkit.aot())
    entry = tomlkit.table()
    entry["name"], entry["sha256"], entry["created"] = name, digest, created
    entry.add(tomlkit.nl())  # a blank line between entries, as people write them
    auth["keys"].append(entry)


def remove_key_entry(document: Any, name: str) -> bool:
    """Remove the entry named `name`; False when there is none. The last one takes the table with it,
    so no `keys = []` is left behind."""
    auth = document.get("auth")
    keys = auth.get("keys") if auth is not None and hasattr(auth, "get") else None
    if keys is None:
        return False
    at = next((i for i, entry in enumerate(keys) if entry.get("name") == name), None)
    if at is None:
        return False
    if len(keys) == 1:
        del auth["keys"]
        if not auth:
            del document["auth"]
    else:
        del keys[at]
    return True
