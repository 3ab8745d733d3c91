"""Short model ids. Every model id is a folder path or a Hugging Face `org/name`, and a slash
breaks clients that read `a/b` as provider/model (openai-agents), so a model may also be named by
an alias: one of `models.aliases` (name -> model), or by default its folder or repo name
(`mlx-community/Qwen3-0.6B-4bit` -> `Qwen3-0.6B-4bit`) for each model the daemon is configured
with (`models.allowed`, `models.preload`, `serve --model`), when no other such model has that name.

Routes turn an alias into its model id before the engine sees it; the response keeps the name the
client sent, the audit row and the metrics the model's one name (model_names.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from mlx_manager.settings import Settings


@dataclass(frozen=True)
class Aliases:
    targets: dict[str, str] = field(default_factory=dict)  # alias -> model id, configured ones first

    def resolve(self, name: str) -> str:
        """The model id an alias stands for; any other name is a model id already."""
        return self.targets.get(name, name)

    def names_of(self, model_id: str) -> list[str]:
        return [alias for alias, target in self.targets.items() if target == model_id]


def default_alias(model_id: str) -> str | None:
    """The last part of a folder path or repo id (without an `@revision`), if it differs from the id."""
    name = model_id.partition("@")[0].rstrip("/").rsplit("/", 1)[-1]
    return name if name and name != model_id else None


def aliases_for(settings: Settings, extra_models: Iterable[str] = ()) -> Aliases:
    """The configured aliases, then a default one for each configured model whose name is unique
    (and is neither a configured alias nor a model id itself)."""
    targets = dict(settings.models.aliases)
    models = list(dict.fromkeys([*extra_models, *settings.models.preload, *settings.models.allowed]))
    by_name: dict[str, list[str]] = {}
    for model_id in models:
        name = default_alias(model_id)
        if name is not None:
            by_name.setdefault(name, []).append(model_id)
    for name, ids in by_name.items():
        if len(ids) == 1 and name not in targets and name not in models:
            targets[name] = ids[0]
    return Aliases(targets)
