"""Models on disk and on the Hugging Face hub: what is here (`cache`), and getting more (`pull`).

Used by the CLI's `models` commands and the daemon's admin routes. Never imports MLX (the one
loadability check runs `engine.check` in its own process); huggingface_hub is imported inside
the functions that need it, so importing this package stays cheap.
"""
