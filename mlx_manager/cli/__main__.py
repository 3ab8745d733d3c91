"""`python -m mlx_manager.cli`: the same program as the `mlx-manager` console script."""

from mlx_manager.cli import main

main()
