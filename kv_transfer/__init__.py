"""KV-block data paths between workers (shared memory, CUDA IPC, ZeroMQ frames)."""
