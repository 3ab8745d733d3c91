"""The one error the hub code raises: what went wrong, what to do, and a kind callers map to
an exit code or an HTTP problem."""

from __future__ import annotations

from typing import Literal

HubErrorKind = Literal[
    "invalid_id",  # not an `org/name` repo id
    "not_found",  # no such repo (or a private one and no token)
    "revision_not_found",
    "gated",  # the repo needs its conditions accepted, and a token
    "unauthorized",  # the token itself was refused
    "offline",  # HF_HUB_OFFLINE is set
    "unreachable",  # no network, or the hub did not answer
    "hub_error",  # the hub answered with an error we have no better name for
    "not_mlx",  # the repo holds no MLX model, or mlx-lm cannot load what arrived
    "disk_full",
    "busy",  # another pull is writing the same file
    "corrupt",  # what arrived does not match the hub's checksum
    "cancelled",  # Ctrl-C, or the client of the daemon's stream went away
    "not_in_cache",
]


class HubError(Exception):
    def __init__(self, kind: HubErrorKind, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.hint = hint
