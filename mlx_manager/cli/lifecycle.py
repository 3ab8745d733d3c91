"""`mlx-manager start | stop | restart | status | logs`: run the daemon in the background under a supervisor."""

from __future__ import annotations
