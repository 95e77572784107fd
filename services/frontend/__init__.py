"""The kvferry frontend: OpenAI-compatible HTTP API and the ZeroMQ SDK endpoint.

Modules, one job each:
- detokenizer: token ids -> stable text deltas (multi-byte safe), stop strings.
- streams: one request's ordered, gapless token stream (first_index bookkeeping).
- router: dispatch (scheduler, with fallback), AddRequest / AbortRequest to workers, the token
  socket, per-request streams, owner tracking across migrations.
- generation: one generation from prompt ids to text deltas (router + detokenizer + stops + deadline).
- params: OpenAI request bodies -> validated generation parameters (OpenAI-format errors).
- metrics: Prometheus metrics.
- http_api: the FastAPI app.
- sdk_server: the ZeroMQ SDK endpoint (protocol.client messages).
- server: the Frontend service that runs all of the above.
"""
