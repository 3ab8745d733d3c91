"""Dynamic shell completion shared by several commands (model ids for `--model`, API key names for `--key`)."""

from __future__ import annotations

import os


def _cached_repo_ids() -> list[str]:
    """Hugging Face repos in the local cache (`models--org--name` folders), as `org/name`."""
    from mlx_manager.hub.cache import hf_cache_dir

    try:
        entries = os.listdir(hf_cache_dir())
    except OSError:
        return []
    return sorted(e[len("models--") :].replace("--", "/", 1) for e in entries if e.startswith("models--"))


def complete_cached_model(incomplete: str) -> list[str]:
    """Repo ids in the Hugging Face cache: what `models rm` can delete."""
    return [repo for repo in _cached_repo_ids() if repo.startswith(incomplete)]


def complete_model(incomplete: str) -> list[str]:
    """Models worth offering: allowed and preloaded ones from the settings, then the HF cache."""
    from mlx_manager.settings import SettingsError, load_settings

    try:
        settings = load_settings()
        configured = [*settings.models.allowed, *settings.models.preload]
    except SettingsError:
        configured = []
    candidates = dict.fromkeys([*configured, *_cached_repo_ids()])
    return [c for c in candidates if c.startswith(incomplete)]


def complete_key_name(incomplete: str) -> list[str]:
    """API key names the daemon would record: `[[auth.keys]]`, then auth.keys_file and the environment."""
    from mlx_manager.settings import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError:
        return []
    names = [key.name for key in settings.auth.keys]
    try:
        from mlx_manager.auth import load_keyring

        names += [name for name, _digest in load_keyring(settings).entries]
    except SettingsError:  # an unreadable keys file or a too-short environment key: offer the rest
        pass
    return [name for name in dict.fromkeys(names) if name.startswith(incomplete)]


def complete_backend(incomplete: str) -> list[str]:
    """Backends a request may be served by: local, the configured ones, then the backend types."""
    from mlx_manager.audit.record import BACKENDS
    from mlx_manager.settings import SettingsError, load_settings

    try:
        names = [backend.name for backend in load_settings().routing.backends]
    except SettingsError:
        names = []
    return [name for name in dict.fromkeys(["local", *names, *BACKENDS]) if name.startswith(incomplete)]
