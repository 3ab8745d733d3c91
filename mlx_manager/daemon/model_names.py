"""One name per model. A request may name a model many ways: a relative or an absolute path, one
with `..` or a trailing slash, a symlink, an alias (aliases.py), a Hugging Face id or its snapshot
folder in the cache. Each is the same model: loaded once (the engine's pool keys models by their
folder), one group in `audit stats --by model`, one metrics label, one entry in /v1/models.

A `ModelName` holds:
  target    the alias resolved: what the engine and the router are asked for;
  identity  the model's one id (`hub.cache.model_identity`: its repo id, or its folder's real
            path), as `models list` and `models ps` show it; the target itself when no model here
            has that name (an upstream's model, an unknown id);
  label     what the audit row and the metrics name: the model's first alias in `models.aliases`
            (the name its operator gave it), else its identity.

Names are worked out once per settings object (a reload makes new ones): what a name resolved to
is kept (up to MAX_KEPT names), a name that resolved to nothing is looked up again next time.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_manager.daemon.aliases import Aliases
from mlx_manager.engine.errors import ModelNotFound
from mlx_manager.engine.pool import ModelAccess, resolve
from mlx_manager.hub.cache import model_identity

MAX_KEPT = 1024


@dataclass(frozen=True)
class ModelName:
    sent: str  # as the request named it (or the default it got): what the answer echoes
    target: str
    identity: str
    label: str
    local: bool  # a model here (a folder it may load), not only a name


class ModelNames:
    def __init__(self, aliases: Aliases, configured: dict[str, str], access: ModelAccess) -> None:
        self.aliases = aliases
        self.access = access
        self._configured = configured  # models.aliases: alias -> model, in the order they were set
        self._identities: dict[str, str] = {}
        self._labels: dict[str, str] | None = None  # identity -> its first configured alias

    def identity(self, target: str) -> str | None:
        """The one id of the model `target` names (not an alias), or None when it is none here."""
        known = self._identities.get(target)
        if known is not None:
            return known
        try:
            identity = model_identity(resolve(target, self.access))
        except ModelNotFound:
            return None
        if len(self._identities) >= MAX_KEPT:
            self._identities.clear()
        self._identities[target] = identity
        return identity

    def _label_of(self, identity: str) -> str:
        if self._labels is None:
            labels: dict[str, str] = {}
            for alias, target in self._configured.items():
                labels.setdefault(self.identity(target) or target, alias)
            self._labels = labels
        return self._labels.get(identity, identity)

    def of(self, sent: str) -> ModelName:
        target = self.aliases.resolve(sent)
        identity = self.identity(target)
        return ModelName(sent, target, identity or target, self._label_of(identity or target), identity is not None)
