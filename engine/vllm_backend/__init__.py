"""vLLM's v1 engine as a kvferry worker engine (`--engine vllm`).

`VllmEngine` (engine.py) runs vLLM's engine core in the worker process and gives it the
interface of kvferry's own engine, so the worker's step loop, streams, load reports and live
migration drive it unchanged. Migrated KV enters vLLM through the KV-connector interface
(connector.py); kv_view.py exposes vLLM's per-layer caches as one block-indexed tensor for
kv_transfer. Importing this package does not import vLLM.
"""
