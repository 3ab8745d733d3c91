"""The per-request limits a route checks once the body is valid: messages and max_tokens.

Refusals are 422 problems that name the limit and the setting, so a client knows what would pass.
(The body size is the middleware's, the rate limit too: both act before the body is read.)
"""

from __future__ import annotations

from mlx_manager.daemon.problems import Problem
from mlx_manager.settings import Settings


def check_messages(count: int, settings: Settings) -> None:
    limit = settings.server.max_messages
    if count > limit:
        raise Problem(
            "limit_exceeded",
            f"messages: {count} messages is more than the limit of {limit} (server.max_messages)",
            param="messages",
            limit=limit,
        )


def max_tokens_for(requested: int | None, settings: Settings, param: str = "max_tokens") -> int:
    """The request's max_tokens, or the default (never above the ceiling); a larger ask is refused."""
    ceiling = settings.models.max_tokens
    if requested is None:
        return min(settings.models.default_max_tokens, ceiling)
    if requested > ceiling:
        raise Problem(
            "limit_exceeded",
            f"{param}: {requested} is more than the limit of {ceiling} tokens (models.max_tokens)",
            param=param,
            limit=ceiling,
        )
    return requested


def check_choices(count: int, settings: Settings) -> None:
    """`n` times the prompts: each is a sequence the engine runs; more than may wait at once is refused."""
    limit = settings.server.queue_limit
    if count > limit:
        raise Problem(
            "limit_exceeded",
            f"n: {count} choices (n times the prompts) is more than the limit of {limit} (server.queue_limit)",
            param="n",
            limit=limit,
        )
