"""The inference daemon: the OpenAI-compatible FastAPI app (`app.create_app`) and its process (`run.run_daemon`).

Nothing is imported here, so `mlx-manager --help` never loads FastAPI or uvicorn.
"""
