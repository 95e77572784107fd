"""Token sampling: greedy, temperature, top-k, top-p, each request with its own generator."""

from __future__ import annotations

import torch

from engine.request import Request


def sample(logits: torch.Tensor, requests: list[Request]) -> list[int]:
    """One token per row of `logits` ([N, vocab], float32) for the matching request."""
    greedy = logits.argmax(dim=-1).tolist()
    out: list[int] = []
    for row, req in enumerate(requests):
        sp = req.sampling
        if sp.greedy:
            out.append(greedy[row])
            continue
        x = logits[row] / sp.temperature
        if 0 < sp.top_k < x.shape[-1]:
            kth = torch.topk(x, sp.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        if sp.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = sorted_p.cumsum(-1) - sorted_p >= sp.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        out.append(int(torch.multinomial(probs, 1, generator=req.generator).item()))
    return out
