"""`mlx-manager bench`: measure a running OpenAI-compatible server, or two side by side."""

# Annotations stay objects here, without `from __future__ import annotations`: Typer reads every
# command's annotations at each start, and a string annotation costs a compile and an eval.

from typing import Annotated, Any

import typer

from mlx_manager.cli.completion import complete_model
from mlx_manager.cli.output import JsonOption, console, fail, print_json

EPILOG = (
    "Examples:\n\n"
    "  mlx-manager bench\n\n"
    "  mlx-manager bench --concurrency 1,8 --requests 32 --max-tokens 128\n\n"
    "  mlx-manager bench --url http://127.0.0.1:10242 --vs http://127.0.0.1:8080 --model ./my-model\n\n"
    "  mlx-manager bench --turns 6 --system-tokens 1000 --max-tokens 48 --concurrency 4 --requests 4\n\n"
    "  MLX_MANAGER_API_KEY=mlxm-... mlx-manager bench"
)


def _levels(value: str) -> list[int]:
    try:
        levels = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{value!r}: give whole numbers separated by commas, e.g. 1,4,8") from None
    if not levels or any(n < 1 or n > 1024 for n in levels):
        raise typer.BadParameter(f"{value!r}: each level must be between 1 and 1024")
    return levels


def _default_url() -> str:
    from mlx_manager.cli.daemon_client import daemon_url
    from mlx_manager.settings import SettingsError, load_settings

    url = daemon_url()
    if url:
        return url
    try:
        settings = load_settings()
    except SettingsError:
        return "http://127.0.0.1:10242"
    return f"http://{settings.server.host}:{settings.server.port}"


def bench(
    url: Annotated[str | None, typer.Option(help="Server to measure (default: the running daemon).")] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Model id to request (default: the first one /v1/models lists).", autocompletion=complete_model
        ),
    ] = None,
    concurrency: Annotated[str, typer.Option(help="Concurrent clients per level, comma-separated.")] = "1,4,8",
    requests: Annotated[int, typer.Option(min=1, max=100000, help="Requests per level.")] = 16,
    max_tokens: Annotated[int, typer.Option(min=1, max=100000, help="max_tokens of every request.")] = 128,
    prompt_tokens: Annotated[int, typer.Option(min=1, max=100000, help="Approximate prompt length in words.")] = 64,
    stream: Annotated[
        bool, typer.Option("--stream/--no-stream", help="Stream responses (needed for time to first token).")
    ] = True,
    turns: Annotated[
        int,
        typer.Option(
            min=1,
            max=1000,
            help="Turns per conversation: more than 1 resends the growing history, as chat clients do;"
            " --requests then counts conversations.",
        ),
    ] = 1,
    system_tokens: Annotated[
        int, typer.Option(min=0, max=100000, help="Approximate length in words of each conversation's system prompt.")
    ] = 0,
    vs: Annotated[
        str | None, typer.Option("--vs", help="A second server to compare against, interleaved level by level.")
    ] = None,
    vs_model: Annotated[
        str | None, typer.Option(help="Model id on the --vs server (default: same as --model).")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Measure tokens/s, time to first token and latency of an OpenAI-compatible server.

    A server with API keys takes the key in MLX_MANAGER_API_KEY (or OPENAI_API_KEY).
    """
    import asyncio  # ~30 ms: paid by this command only, not by every `mlx-manager` run

    from mlx_manager.bench import BenchError, BenchPlan, run_bench

    plan = BenchPlan(_levels(concurrency), requests, max_tokens, prompt_tokens, stream, turns, system_tokens)
    urls = [url or _default_url()] + ([vs] if vs else [])
    for u in urls:
        if not u.startswith(("http://", "https://")):
            fail(f"{u!r} is not an http:// or https:// URL", code=2, json_output=json_output)
    models = [model] + ([vs_model or model] if vs else [])
    total = len(urls) * len(plan.concurrency) * plan.requests  # conversations, in conversation mode
    try:
        if json_output:
            reports = asyncio.run(run_bench(urls, models, plan))
        else:
            from rich.progress import Progress

            with Progress(console=console, transient=True) as progress:
                task = progress.add_task("benchmarking", total=total)
                reports = asyncio.run(run_bench(urls, models, plan, tick=lambda: progress.advance(task)))
    except BenchError as exc:
        fail(str(exc), json_output=json_output)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if json_output:
        from mlx_manager.bench import ratios

        out: dict[str, Any] = {"plan": plan.__dict__, "servers": [[r.as_dict() for r in rs] for rs in reports]}
        if vs:
            out["ratios"] = [ratios(a, b) for a, b in zip(*reports, strict=True)]
        print_json(out)
        return
    _render(reports, urls)


def _render(reports, urls) -> None:
    from rich.table import Table

    from mlx_manager.bench import ratios

    def ms(value):
        return "-" if value is None else f"{value * 1000:.0f}"

    conversation = reports[0][0].ttft_first_turn_p50 is not None
    table = Table(title="mlx-manager bench", title_justify="left")
    names = [
        "server",
        "clients",
        "requests",
        "errors",
        "tok/s",
        "TTFT p50 ms",
        "TTFT p95 ms",
        "latency p50 ms",
        "latency p95 ms",
        "tok/s per req",
    ]
    if conversation:
        names += ["TTFT p50 turn 1", "TTFT p50 later"]
    for name in names:
        table.add_column(name, justify="left" if name in ("server", "errors") else "right")
    for level in range(len(reports[0])):
        rows = [rs[level] for rs in reports]
        for label, r in zip("AB", rows, strict=False):
            errors = ", ".join(f"{k}: {v}" for k, v in r.errors.items()) or "0"
            per = "-" if r.tokens_per_second_per_request is None else f"{r.tokens_per_second_per_request:.1f}"
            name = f"{label} {r.url}" if len(rows) > 1 else r.url
            cells = [
                name,
                str(r.concurrency),
                str(r.requests),
                errors,
                f"{r.tokens_per_second:.1f}",
                ms(r.ttft_p50),
                ms(r.ttft_p95),
                ms(r.latency_p50),
                ms(r.latency_p95),
                per,
            ]
            if conversation:
                cells += [ms(r.ttft_first_turn_p50), ms(r.ttft_later_turns_p50)]
            table.add_row(*cells)
        if len(rows) == 2:
            q = ratios(*rows)

            def x(name: str, q: dict[str, float | None] = q) -> str:
                return "-" if q[name] is None else f"{q[name]:.2f}x"

            cells = [
                "A/B",
                str(rows[0].concurrency),
                "",
                "",
                x("tokens_per_second"),
                x("ttft_p50"),
                x("ttft_p95"),
                x("latency_p50"),
                x("latency_p95"),
                x("tokens_per_second_per_request"),
            ]
            if conversation:
                cells += [x("ttft_first_turn_p50"), x("ttft_later_turns_p50")]
            table.add_row(*cells, style="bold")
    console.print(table)
