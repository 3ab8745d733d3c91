"""`mlx-manager serve`: run the inference daemon in the foreground."""

# Annotations stay objects here, without `from __future__ import annotations`: Typer reads every
# command's annotations at each start, and a string annotation costs a compile and an eval.

from typing import Annotated

import typer

from mlx_manager.cli.completion import complete_model

EPILOG = (
    "Examples:\n\n"
    "  mlx-manager serve\n\n"
    "  mlx-manager serve --model ./models/my-model --port 8080\n\n"
    "  mlx-manager keys add laptop && mlx-manager serve --host 0.0.0.0"
)

# Shared with start/restart: a network address without any API key is refused unless this is given.
InsecureOption = Annotated[
    bool,
    typer.Option(
        "--insecure-no-auth",
        help="Allow listening on a network address without any API key (anyone who can reach it may use the API).",
    ),
]


ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Preload this model (a local folder or a cached Hugging Face id).",
        autocompletion=complete_model,
    ),
]


def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on (default from settings: 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (default from settings: 10242).")] = None,
    model: ModelOption = None,
    insecure_no_auth: InsecureOption = False,
) -> None:
    """Run the OpenAI-compatible inference daemon in the foreground.

    Ctrl-C or SIGTERM stops it gracefully: running requests may finish (server.drain_timeout).
    On an address other than loopback it needs an API key (`mlx-manager keys add NAME`).
    """
    from mlx_manager.cli.output import fail
    from mlx_manager.daemon.run import StartupError, run_daemon

    try:
        run_daemon(host=host, port=port, model=model, insecure_no_auth=insecure_no_auth)
    except StartupError as exc:
        fail(exc.message.rstrip(".") + ".", exc.hint, code=exc.exit_code)
