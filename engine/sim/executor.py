"""The sim executor: the engine's scheduler and block manager with no model behind them.

Each step takes the time the latency model gives; in `real` clock mode it sleeps that long (a live
sim worker), in `virtual` mode it only reports it (the offline simulator advances its own clock).
Tokens are a deterministic function of (request id, output index), so a migrated request emits
the same tokens wherever it runs.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable

import torch

from engine.scheduler import ModelOutput, SchedulerOutput
from engine.sim.latency import LatencyModel


def sim_token(request_id: str, index: int, vocab_size: int) -> int:
    h = zlib.crc32(request_id.encode()) ^ (index * 0x9E3779B1)
    h = (h ^ (h >> 15)) * 0x2C1B3C6D & 0xFFFFFFFF
    return (h ^ (h >> 12)) % vocab_size


class SimExecutor:
    """Executor with the same interface as the model runner; KV blocks carry no data."""

    kind = "sim"

    def __init__(self, latency: LatencyModel, block_size: int, clock: str = "real") -> None:
        if clock not in ("real", "virtual"):
            raise ValueError("clock must be 'real' or 'virtual'")
        self.latency = latency
        self.clock = clock
        self.block_size = block_size
        self.bytes_per_block = latency.kv_bytes_per_token * block_size
        self.last_step_seconds = 0.0

    def execute(self, sched: SchedulerOutput, table: Callable[[str], list[int]]) -> ModelOutput:
        prefill = pairs = 0
        for s in sched.scheduled:
            if s.num_new_tokens > 1:
                prefill += s.num_new_tokens
                # causal attention of a prefill chunk: each new token attends to the context before it
                pairs += s.num_new_tokens * (s.start + (s.num_new_tokens + 1) // 2)
        context = sum(s.start + s.num_new_tokens for s in sched.scheduled)
        self.last_step_seconds = self.latency.step_seconds(len(sched.scheduled), prefill, context, pairs)
        if self.clock == "real":
            time.sleep(self.last_step_seconds)
        vocab = self.latency.vocab_size
        return ModelOutput(tokens={s.request.request_id: sim_token(s.request.request_id, s.request.num_output_tokens,
                                                                   vocab)
                                   for s in sched.scheduled if s.samples})

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        return torch.empty((len(block_ids), 0), dtype=torch.uint8)

    def write_blocks(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        if blocks.shape[0] != len(block_ids):
            raise ValueError(f"{blocks.shape[0]} blocks of data for {len(block_ids)} block ids")
