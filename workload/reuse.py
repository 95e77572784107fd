"""Traces with KV reuse (issue 16): multi-turn conversations and shared system prompts.

A prompt is a list of segments (segment id, length); `segment_tokens` derives a segment's token ids
from its id, so two prompts that begin with the same segments share that prefix token for token
and nothing else (a 2k-token prompt is two integers a segment, not 2k of them). A negative id
`answer_segment(j)` is the answer of trace request j: the first `length` tokens that request
generated, whatever they were (`prompt_tokens` asks its `answer` callback for them; without one
it makes them up from the id, so a replay that cannot know the answers still gets a consistent
prompt, whose hits then stop at the end of the previous turn's prompt).

- `multi_turn`: conversations arrive as a Poisson process; each has `turns` turns. Turn i's prompt
  is turn i-1's prompt, plus its answer, plus a new user message; turn 0's is the system prompt of
  the conversation's application (one of `groups`, chosen uniformly; 0 groups: a system prompt of
  its own) plus the first message. Arrivals follow a fixed schedule: turn i comes `think_s` after
  turn i-1's *expected* end (its decode at `decode_s_per_token`), not after its actual end, so the
  trace is a plain list of arrivals that every policy replays identically. Conversations
  interleave.
- `system_prompt`: `groups` long shared prefixes (one per application or tenant), each request one
  of them (chosen uniformly) plus a private suffix.

Deterministic for a seed; JSONL through workload.traces (the `segments` key).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

from workload.traces import TraceError, TraceRequest, arrival_times

REUSE_TRACES = ("multi-turn", "system-prompt")
_MIX = 0x9E3779B97F4A7C15  # spreads segment ids over the random streams


def segment_tokens(segment_id: int, length: int, vocab_size: int) -> list[int]:
    """The token ids of a segment: deterministic in (id, length), in [1, vocab_size)."""
    rng = np.random.default_rng((segment_id * _MIX) & ((1 << 64) - 1))
    return rng.integers(1, vocab_size, size=length).tolist()


def answer_segment(request_index: int) -> int:
    """The segment id that stands for trace request `request_index`'s answer."""
    return -1 - request_index


def prompt_tokens(segments: tuple[tuple[int, int], ...], vocab_size: int,
                  answer: Callable[[int, int], list[int]] | None = None) -> list[int]:
    """A segmented prompt's token ids; `answer(request_index, length)` gives an answer segment's."""
    out: list[int] = []
    for seg, n in segments:
        out += answer(-seg - 1, n) if seg < 0 and answer is not None else segment_tokens(seg, n, vocab_size)
    return out


def multi_turn(conversations: int, rate: float, *, turns: int = 4, groups: int = 0, system_len: int = 512,
               user_len: int = 64, answer_len: int = 128, think_s: float = 10.0, decode_s_per_token: float = 0.03,
               seed: int = 0) -> list[TraceRequest]:
    """`conversations` conversations starting at `rate` per second (Poisson); see the module docstring."""
    if conversations < 0 or turns < 1 or groups < 0 or min(system_len, user_len, answer_len) < 1:
        raise TraceError("multi-turn needs conversations >= 0, turns >= 1, groups >= 0 and lengths >= 1")
    gaps, pick = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    starts = arrival_times(conversations, rate, 1.0, gaps)
    which = pick.integers(0, max(1, groups), size=conversations).tolist()
    ids = itertools.count(groups + 1)  # 1..groups: the applications' shared system prompts
    turn_ids = itertools.count()
    made: list[tuple[float, int, tuple[tuple[int, int], ...]]] = []  # (arrival, turn id, segments)
    for start, g in zip(starts, which):
        segs: tuple[tuple[int, int], ...] = ((1 + g if groups else next(ids), system_len),)
        t = start
        for _ in range(turns):
            segs = segs + ((next(ids), user_len),)
            tid = next(turn_ids)
            made.append((t, tid, segs))
            t += think_s + answer_len * decode_s_per_token
            segs = segs + ((-1 - tid, answer_len),)  # the answer joins the next turn's history
    made.sort(key=lambda m: (m[0], m[1]))
    index = {tid: i for i, (_, tid, _) in enumerate(made)}  # answers name requests by their place in the trace
    return [TraceRequest(t, sum(n for _, n in segs), answer_len, 0,
                         tuple((answer_segment(index[-k - 1]) if k < 0 else k, n) for k, n in segs))
            for t, _, segs in made]


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
    (n // 4 conversations of 4 turns, starting at rate / 4 per second: a chat application's shape,
    4 applications' 1,024-token system prompts, 256-token messages, 64-token answers, 3 s between
    an answer and the next message) or `system-prompt`."""
    if name == "multi-turn":
        turns = 4
        return multi_turn(max(1, n // turns), rate / turns, turns=turns, groups=4, system_len=1024, user_len=256,
                          answer_len=64, think_s=3.0, seed=seed)
    if name == "system-prompt":
        return system_prompt(n, rate, seed=seed)
    raise TraceError(f"unknown reuse trace {name!r} (known: {', '.join(REUSE_TRACES)})")
