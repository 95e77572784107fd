"""KV-block data paths between workers (shared memory, ZeroMQ frames)."""
