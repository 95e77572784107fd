"""Token sampling and logprobs.

Per request, in vLLM's order: the logits are shaped (the grammar's mask for structured output, logit_bias, EOS and stop tokens masked until
min_tokens, then the repetition penalty over prompt and output and the presence and frequency
penalties over the output), then the token is the argmax (greedy) or drawn from the request's own generator
after temperature, min-p, top-k and top-p. Everything shaping depends on is in the request's
tokens and sampling parameters, so it moves with a migrated request and needs no state of its own.

Logprobs are of the model's raw distribution (log_softmax of the logits before any of the
above), as vLLM's default `logprobs_mode = "raw_logprobs"`: what an evaluation harness and an
independent oracle (transformers) compute.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch

from engine.grammar import allowed
from engine.request import Request
from protocol.payloads import TokenLogprobs

PROMPT_LOGPROB_ROWS = 256  # prompt positions turned into full-vocabulary logits at a time


def shape_logits(x: torch.Tensor, req: Request, eos_token_ids: Collection[int]) -> torch.Tensor:
    """`x` ([vocab], a copy the caller owns) with the request's penalties, bias and min_tokens mask applied."""
    sp = req.sampling
    if req.matcher is not None:  # structured output: only what the grammar allows next
        x.masked_fill_(~allowed(req.matcher, x.shape[-1]), float("-inf"))
    # vLLM's order: logit_bias and the min_tokens mask first, then the penalties over what they left.
    if sp.logit_bias:
        ids = torch.tensor(list(sp.logit_bias), dtype=torch.long, device=x.device)
        x[ids] += torch.tensor(list(sp.logit_bias.values()), dtype=x.dtype, device=x.device)
    if sp.min_tokens and req.num_output_tokens + sp.prior_output_tokens < sp.min_tokens:
        banned = {*eos_token_ids, *sp.stop_token_ids}
        if banned:
            x[torch.tensor(sorted(banned), dtype=torch.long, device=x.device)] = float("-inf")
    if sp.repetition_penalty != 1.0:
        ids = torch.tensor(sorted(set(req.token_ids)), dtype=torch.long, device=x.device)
        v = x[ids]
        x[ids] = torch.where(v > 0, v / sp.repetition_penalty, v * sp.repetition_penalty)
    if sp.presence_penalty or sp.frequency_penalty:
        output = req.token_ids[req.num_prompt_tokens - sp.prior_output_tokens:]
        if output:
            ids, counts = torch.tensor(output, dtype=torch.long, device=x.device).unique(return_counts=True)
            x[ids] -= sp.frequency_penalty * counts.to(x.dtype) + sp.presence_penalty
    return x


def _draw(x: torch.Tensor, req: Request) -> int:
    sp = req.sampling
    x = x / sp.temperature
    if 0 < sp.top_k < x.shape[-1]:
        kth = torch.topk(x, sp.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if sp.min_p > 0.0:
        probs = probs.masked_fill(probs < sp.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    if sp.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_p.cumsum(-1) - sorted_p >= sp.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=req.generator).item())


def sample(logits: torch.Tensor, requests: list[Request], eos_token_ids: Collection[int] = ()) -> list[int]:
    """One token per row of `logits` ([N, vocab], float32) for the matching request."""
    greedy = logits.argmax(dim=-1).tolist()
    out: list[int] = []
    for row, req in enumerate(requests):
        sp = req.sampling
        shaped = sp.shapes_logits
        if sp.greedy and not shaped:
            out.append(greedy[row])
            continue
        x = shape_logits(logits[row].clone(), req, eos_token_ids) if shaped else logits[row]
        out.append(int(x.argmax().item()) if sp.greedy else _draw(x, req))
    return out


def _entries(lp: torch.Tensor, targets: torch.Tensor, k: int) -> list[TokenLogprobs]:
    """TokenLogprobs of `targets` ([M]) under the rows of `lp` ([M, vocab] log-probabilities)."""
    chosen = lp.gather(1, targets[:, None])  # [M, 1]
    ranks = (lp > chosen).sum(dim=1) + 1
    if k:
        top = torch.topk(lp, k, dim=1)
        top_ids, top_lps = top.indices.tolist(), top.values.tolist()
    else:
        top_ids = top_lps = [[] for _ in range(lp.shape[0])]
    return [TokenLogprobs(c, r, i, v) for c, r, i, v in zip(chosen[:, 0].tolist(), ranks.tolist(), top_ids, top_lps)]


def token_logprobs(logits: torch.Tensor, requests: list[Request], tokens: list[int]) -> list[TokenLogprobs | None]:
    """Per row: the sampled token's logprob and the request's top `logprobs`, or None if it asked for none."""
    rows = [i for i, r in enumerate(requests) if r.sampling.logprobs is not None]
    out: list[TokenLogprobs | None] = [None] * len(requests)
    if not rows:
        return out
    k = max(requests[i].sampling.logprobs or 0 for i in rows)
    lp = torch.log_softmax(logits[rows].float(), dim=-1)
    entries = _entries(lp, torch.tensor([tokens[i] for i in rows], device=lp.device), k)
    for i, e in zip(rows, entries):
        want = requests[i].sampling.logprobs or 0
        out[i] = e if want == k else TokenLogprobs(e.logprob, e.rank, e.top_ids[:want], e.top_logprobs[:want])
    return out


def prompt_logprobs(compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: list[int],
                    k: int) -> list[TokenLogprobs]:
    """Logprobs of `targets[i]` after the position whose hidden state is `hidden[i]`, in slices of
    PROMPT_LOGPROB_ROWS so a long prompt never holds all its full-vocabulary logits at once."""
    out: list[TokenLogprobs] = []
    for a in range(0, len(targets), PROMPT_LOGPROB_ROWS):
        b = min(a + PROMPT_LOGPROB_ROWS, len(targets))
        lp = torch.log_softmax(compute_logits(hidden[a:b]).float(), dim=-1)
        out.extend(_entries(lp, torch.tensor(targets[a:b], device=lp.device), k))
    return out
