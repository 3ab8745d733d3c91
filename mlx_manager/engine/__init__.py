"""The inference engine: the only package that imports mlx / mlx_lm.

Callers (the daemon) import what they use from its modules: `engine.Engine`,
`config.EngineConfig`, the request and event types in `types`, the errors in `errors`. This
file imports nothing, and MLX itself is imported lazily by the inference thread, so importing
any of them stays cheap.

    engine = Engine(EngineConfig(...)); engine.start()
    job = engine.submit(GenerationRequest(model=..., messages=[...]))   # may raise Overloaded
    try:
        async for event in job:          # Started, TextDelta..., Finished; or raises EngineError
            ...
    finally:
        job.cancel()                     # no-op once finished; frees the batch slot otherwise

    vectors = await engine.submit_embedding(EmbeddingRequest(model=..., inputs=[...])).result()

Inside, imports flow one way: engine -> worker -> batch / pool / embedding_queue -> jobs ->
types / errors. The worker never sees the Engine; jobs report to an `Admission` counter.
"""
