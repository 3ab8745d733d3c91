"""The API dialects besides OpenAI's Chat Completions: Anthropic's Messages and OpenAI's Responses.

Each has a `protocol` module (its request, response and stream-event models) and a `serving`
module that translates a request into one `GenerationRequest` and the engine's events back;
the routers (daemon/routes/messages.py, responses.py) only wire them to HTTP.
"""
