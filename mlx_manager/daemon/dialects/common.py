"""What the dialects share: strict request models and the "not supported" refusal.

Both APIs refuse fields they do not define, and so do we (422, naming the field). A field they
define that this server does not implement is refused with a 400 `not_supported` problem that
names it: validators raise `not_supported(...)`, and the validation handler turns it into that
400 (daemon/handlers.py). Nothing a client sends is dropped without a word.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo
from pydantic_core import PydanticCustomError

NOT_SUPPORTED = "not_supported"  # the pydantic error type of a refusal
# The tag of the union member that refuses what a dialect defines but this server cannot take
# (an image block, a server tool...): dropped from the location a refusal names.
UNSUPPORTED = "unsupported"


class Strict(BaseModel):
    """A request object of a dialect: a field it does not define is an error."""

    model_config = ConfigDict(extra="forbid")


def not_supported(message: str) -> PydanticCustomError:
    """Raise it from a validator: the request is answered with a 400 `not_supported` problem."""
    return PydanticCustomError(NOT_SUPPORTED, message)


def refuse_when_set(value: Any, info: ValidationInfo) -> Any:
    """A field validator for fields the dialect defines and this server does not implement:
    absent or null passes, anything else is refused by name."""
    if value is not None:
        raise not_supported("not supported by this server")
    return value
