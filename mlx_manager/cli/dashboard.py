"""`mlx-manager dashboard`: the running daemon's admin dashboard, with a one-time sign-in link."""

# Annotations stay objects here, without `from __future__ import annotations`: Typer reads every
# command's annotations at each start, and a string annotation costs a compile and an eval.

from typing import Annotated

import typer

from mlx_manager.cli.output import JsonOption, fail, print_json, say

EPILOG = "Examples:\n\n  mlx-manager dashboard\n\n  mlx-manager dashboard --open"


def dashboard(
    open_browser: Annotated[
        bool, typer.Option("--open", help="Also open the link in the default web browser.")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Print the admin dashboard's address with a one-time sign-in link for this machine.

    The daemon makes the link for whoever can read the admin token (this machine's user who runs
    it); it signs a browser on this machine in as admin, once, within two minutes. Others sign in
    at the same address with an API key."""
    from mlx_manager.cli.daemon_client import DaemonError, admin_call, daemon_url

    try:
        answer = admin_call("POST", "/admin/ui/login-link")
    except DaemonError as error:
        if not error.running:
            fail("no daemon is running.", "Start one with `mlx-manager start`.", json_output=json_output)
        fail(f"{error.message}.", json_output=json_output)
    url = f"{daemon_url()}{answer['path']}"
    expires = round(answer["expires_in_seconds"])
    if json_output:
        print_json({"url": url, "expires_in_seconds": expires})
    else:
        say(url)
        say(f"A one-time sign-in link for a browser on this machine, valid for {expires} s.", err=True)
    if open_browser:
        import webbrowser

        if not webbrowser.open(url):
            fail("could not open a web browser here.", "Open the link above yourself.", json_output=json_output)
