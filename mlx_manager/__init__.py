"""mlx-manager: serve, supervise, configure and audit local MLX models."""

__version__ = "0.1.0"
