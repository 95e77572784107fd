"""Traces with KV reuse (issue 16): multi-turn conversations and shared system prompts.

A prompt is a list of segments (segment id, length); `segment_tokens` derives a segment's token ids
from its id, so two prompts that begin with the same segments share that prefix token for token
and nothing else (a 2k-token prompt is two integers a segment, not 2k of them).

- `multi_turn`: conversations arrive as a Poisson process; each has `turns` turns. Turn i's prompt
  is turn i-1's prompt, plus its answer, plus a new user message. Arrivals follow a fixed
  schedule: turn i comes `think_s` after turn i-1's *expected* end (its prefill and decode at
  `decode_s_per_token`), not after its actual end, so the trace is a plain list of arrivals that
  every policy replays identically. The answer is a segment of its own: a real system would find
  the previous turn's generated tokens cached too, the simulator's engine generates other tokens,
  so hits stop at the end of the previous turn's prompt (conservative for every policy alike).
  Conversations interleave.
- `system_prompt`: `groups` long shared prefixes (one per application or tenant), each request one
  of them (chosen uniformly) plus a private suffix.

Deterministic for a seed; JSONL through workload.traces (the `segments` key).
"""

from __future__ import annotations

import itertools

import numpy as np

from workload.traces import TraceError, TraceRequest, arrival_times

REUSE_TRACES = ("multi-turn", "system-prompt")
_MIX = 0x9E3779B97F4A7C15  # spreads segment ids over the random streams


def segment_tokens(segment_id: int, length: int, vocab_size: int) -> list[int]:
    """The token ids of a segment: deterministic in (id, length), in [1, vocab_size)."""
    rng = np.random.default_rng((segment_id * _MIX) & ((1 << 64) - 1))
    return rng.integers(1, vocab_size, size=length).tolist()


def prompt_tokens(segments: tuple[tuple[int, int], ...], vocab_size: int) -> list[int]:
    out: list[int] = []
    for seg, n in segments:
        out += segment_tokens(seg, n, vocab_size)
    return out


def multi_turn(conversations: int, rate: float, *, turns: int = 4, system_len: int = 512, user_len: int = 64,
               answer_len: int = 128, think_s: float = 10.0, decode_s_per_token: float = 0.03,
               seed: int = 0) -> list[TraceRequest]:
    """`conversations` conversations starting at `rate` per second (Poisson); see the module docstring."""
    if conversations < 0 or turns < 1 or min(system_len, user_len, answer_len) < 1:
        raise TraceError("multi-turn needs conversations >= 0, turns >= 1 and lengths >= 1")
    starts = arrival_times(conversations, rate, 1.0, np.random.default_rng(seed))
    ids = itertools.count(1)
    out: list[TraceRequest] = []
    for start in starts:
        segs: tuple[tuple[int, int], ...] = ((next(ids), system_len),)
        t = start
        for turn in range(turns):
            segs = segs + ((next(ids), user_len),)
            length = sum(n for _, n in segs)
            out.append(TraceRequest(t, length, answer_len, 0, segs))
            t += think_s + answer_len * decode_s_per_token
            segs = segs + ((next(ids), answer_len),)  # the answer joins the next turn's history
    out.sort(key=lambda r: r.arrival_s)
    return out


def system_prompt(n: int, rate: float, *, groups: int = 8, prefix_len: int = 1536, suffix_len: int = 128,
                  output_len: int = 128, seed: int = 0) -> list[TraceRequest]:
    """`n` requests at `rate` (Poisson), each one of `groups` shared prefixes plus its own suffix."""
    if n < 0 or groups < 1 or min(prefix_len, suffix_len, output_len) < 1:
        raise TraceError("system-prompt needs n >= 0, groups >= 1 and lengths >= 1")
    gaps, pick = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    times = arrival_times(n, rate, 1.0, gaps)
    which = pick.integers(0, groups, size=n).tolist()
    return [TraceRequest(t, prefix_len + suffix_len, output_len, 0, ((1 + g, prefix_len), (1000 + groups + i, suffix_len)))
            for i, (t, g) in enumerate(zip(times, which))]


def generate_reuse(name: str, n: int, rate: float, seed: int = 0) -> list[TraceRequest]:
    """A reuse trace by name, about `n` requests arriving at about `rate` per second: `multi-turn`
    (n // 4 conversations of 4 turns, starting at rate / 4 per second) or `system-prompt`."""
    if name == "multi-turn":
        turns = 4
        return multi_turn(max(1, n // turns), rate / turns, turns=turns, seed=seed)
    if name == "system-prompt":
        return system_prompt(n, rate, seed=seed)
    raise TraceError(f"unknown reuse trace {name!r} (known: {', '.join(REUSE_TRACES)})")
