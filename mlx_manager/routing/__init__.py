"""Routing: which backend serves a generation — the local engine, or an upstream server — and the
translation to and from the upstream's dialect.

- `router`: routes (model patterns) to a backend or a group, fallbacks, and `RoutedJob`, the job
  the daemon iterates whichever backend serves it.
- `backend`: one upstream server: its shared HTTP client, its health (cooldown, health checks).
- `upstream`: `UpstreamJob`, one generation on an upstream, seen as an engine job.
- `openai_wire`, `anthropic_wire`: a `GenerationRequest` as the upstream's request body, and its
  streamed answer as the engine's events (so every dialect the daemon speaks reaches every backend).
- `relay`, `message_relay`: a stream to a backend of the client's own dialect, relayed as it came
  (chat to `openai`, Messages to `anthropic`), only the id and model name rewritten.
- `network`, `chunked`: the sockets under the backends' httpx clients, and a relayed stream's
  chunked body read straight from them (not through h11 and httpx a chunk per token).
- `keyref`: API keys given by reference (`env:NAME`, a file), never in the config file.

Imports: daemon -> routing -> engine.types / engine.errors (plain Python, no MLX) and settings.
"""
