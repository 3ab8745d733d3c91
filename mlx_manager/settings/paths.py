"""Where mlx-manager keeps its files: everything lives under `home()`, so `MLX_MANAGER_HOME` moves
config, audit database, logs and pid files at once."""

from __future__ import annotations

import os
from pathlib import Path

ENV_PREFIX = "MLX_MANAGER_"


def home() -> Path:
    """The folder that holds every file mlx-manager keeps."""
    env = os.environ.get(f"{ENV_PREFIX}HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_config_path

    return user_config_path("mlx-manager", appauthor=False)


def config_path() -> Path:
    return home() / "config.toml"
