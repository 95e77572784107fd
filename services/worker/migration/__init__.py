"""Live migration in the worker (design §5): the source coordinator, the destination's handler,
their KV data paths and metrics."""
