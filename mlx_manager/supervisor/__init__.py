"""The supervisor: runs the daemon in the background, restarts it with backoff, watches its health.

`python -m mlx_manager.supervisor` is the long-lived process; `control` is what the CLI uses to
start, stop and inspect it; `state` is the one JSON file and the lock they share.
"""
