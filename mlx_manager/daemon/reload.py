"""Live reload: re-read the settings, swap them in, tell the engine; report what needs a restart."""

from __future__ import annotations

import logging

from mlx_manager.auth import load_keyring
from mlx_manager.daemon.problems import Problem
from mlx_manager.daemon.schemas import ReloadResult
from mlx_manager.daemon.state import DaemonState
from mlx_manager.settings import SettingsError, load_settings, reload_changes

log = logging.getLogger("mlx_manager.daemon")


def reload_settings(daemon: DaemonState) -> ReloadResult:
    try:
        # The same flags as at start, so `serve --port 8080` does not read as a port change.
        new = load_settings(daemon.flag_overrides)
        keyring = load_keyring(new)  # an unreadable keys file must not leave the API open
        daemon.router.configure(new)  # a backend key that cannot be read changes nothing
    except SettingsError as exc:
        log.warning("settings reload refused, keeping the running settings: %s", exc)
        raise Problem("invalid_settings", f"settings not reloaded, the running ones are kept: {exc}") from None
    # A key the daemon reads only at start (settings.schema's RESTART flag) is reported, not applied.
    applied, restart = reload_changes(daemon.settings, new)
    changed = applied + restart
    daemon.settings = new  # requests that start from now on see the new values
    if keyring != daemon.keyring:  # added or revoked keys hold from the next request on
        log.info("API keys reloaded: %d key(s)", len(keyring))
    daemon.keyring = keyring
    if changed:
        daemon.engine.reconfigure(daemon.engine_config())
    if "log.level" in changed:
        logging.getLogger("mlx_manager").setLevel(new.log.level.upper())
    log.info("settings reloaded: applied %s; restart needed for %s", applied or "nothing", restart or "nothing")
    return ReloadResult(applied=applied, restart_needed=restart, error=None)
