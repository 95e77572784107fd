"""Runs the model for one scheduled step: builds the flat batch, runs the decoder, samples."""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.block_manager import blocks_for
from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.model import paged_decode_cpu
from engine.model.attention import AttentionMetadata, PrefillChunk
from engine.model.llama import LlamaForCausalLM
from engine.sampler import prompt_logprobs, sample, token_logprobs
from engine.scheduler import ModelOutput, ScheduledRequest, SchedulerOutput


class ModelRunner:
    """The torch executor: owns the model and the KV cache tensors."""

    kind = "torch"

    def __init__(self, model: LlamaForCausalLM, cfg: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, eos_token_ids: tuple[int, ...] = ()) -> None:
        self.model = model
        self.eos_token_ids = eos_token_ids  # masked until a request's min_tokens
        self.cfg = cfg
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        self.kv = KVCache(cfg, num_blocks, block_size, dtype, device)
        self.bytes_per_block = KVCache.bytes_per_block(cfg, block_size, dtype)
        if self.device.type == "cpu":
            paged_decode_cpu.available()  # build / load the fused decode kernel now, not in the first step

    def execute(self, sched: SchedulerOutput, table: Callable[[str], list[int]]) -> ModelOutput:
        bs = self.block_size
        decodes = [s for s in sched.scheduled if s.num_new_tokens == 1]
        prefills = [s for s in sched.scheduled if s.num_new_tokens > 1]
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        tables: list[list[int]] = []
        for s in decodes:
            p, t = s.start, table(s.request.request_id)
            ids.append(s.request.token_ids[p])
            positions.append(p)
            slots.append(t[p // bs] * bs + p % bs)
            tables.append(t[: p // bs + 1])
        meta = AttentionMetadata(slot_mapping=torch.empty(0), num_decode=len(decodes))
        if decodes:
            width = max(len(t) for t in tables)
            padded = [t + [0] * (width - len(t)) for t in tables]
            meta.decode_block_tables = torch.tensor(padded, dtype=torch.long, device=self.device)
            # The SDPA fallback in attention._decode derives its mask from these lazily.
            meta.decode_context_lens = torch.tensor([p + 1 for p in positions], dtype=torch.long,
                                                    device=self.device)
        flat_pos = [torch.tensor(positions, dtype=torch.long)]
        flat_slots = [torch.tensor(slots, dtype=torch.long)]
        q_start = len(decodes)
        for s in prefills:
            n, start = s.num_new_tokens, s.start
            t = torch.tensor(table(s.request.request_id), dtype=torch.long)
            ids.extend(s.request.token_ids[start : start + n])
            pos = torch.arange(start, start + n)
            flat_pos.append(pos)
            flat_slots.append(t[pos // bs] * bs + pos % bs)
            chunk = PrefillChunk(q_start=q_start, q_len=n, start_pos=start)
            if start > 0:
                ctx = start + n
                chunk.block_table = t[: blocks_for(ctx, bs)].to(self.device)
                allowed = torch.arange(ctx)[None, :] <= pos[:, None]  # [n, ctx]: causal within the context
                # Additive, in the model's dtype, once per step: SDPA would otherwise convert a
                # boolean mask in every layer (`aten::where`, ~3 % of a cached-prefix prefill).
                chunk.mask = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill_(
                    ~allowed, float("-inf")).to(self.device)
            meta.prefills.append(chunk)
            q_start += n
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos_t = torch.cat(flat_pos).to(self.device)
        meta.slot_mapping = torch.cat(flat_slots).to(self.device)

        hidden = self.model(input_ids, pos_t, meta, self.kv.layers)
        out = ModelOutput()
        rows, reqs = [], []
        offset = 0
        for s in decodes + prefills:
            if s.num_new_tokens > 1 and s.request.needs_prompt_logprobs:
                self._prompt_logprobs(s, hidden[offset : offset + s.num_new_tokens], out)
            offset += s.num_new_tokens
            if s.samples:
                rows.append(offset - 1)
                reqs.append(s.request)
        if not rows:
            return out
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        tokens = sample(logits, reqs, self.eos_token_ids)
        for r, tok, lp in zip(reqs, tokens, token_logprobs(logits, reqs, tokens)):
            out.tokens[r.request_id] = tok
            if lp is not None:
                out.logprobs[r.request_id] = lp
        return out

    def _prompt_logprobs(self, s: ScheduledRequest, hidden: torch.Tensor, out: ModelOutput) -> None:
        """The logprobs of the prompt tokens this chunk predicts and the request does not have yet
        (a prefill recomputed after preemption repeats none)."""
        req = s.request
        have = max(1, len(req.prompt_logprobs))  # entries so far (the first prompt token's is None)
        first = max(s.start, have - 1)  # the first position whose prediction is new
        last = min(s.start + s.num_new_tokens, req.num_prompt_tokens - 1)  # exclusive
        if first >= last:
            return
        targets = req.token_ids[first + 1 : last + 1]
        rows = hidden[first - s.start : last - s.start]
        out.prompt_logprobs[req.request_id] = prompt_logprobs(
            self.model.compute_logits, rows, targets, req.sampling.prompt_logprobs or 0)

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        return self.kv.read_blocks(block_ids)

    def write_blocks(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        self.kv.write_blocks(block_ids, blocks)
