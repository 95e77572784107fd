"""A request inside the engine: its tokens, sampling parameters and migratable state."""

from __future__ import annotations

import enum
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from engine.errors import InvalidRequestError, MigrationError
from protocol.payloads import Grammar, MigratableState, TokenLogprobs
from protocol.payloads import SamplingParams as WireSamplingParams

STATE_VERSION = 1


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no blocks (new, or preempted)
    RUNNING = "running"  # in the batch, holds blocks
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop token
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # failed inside the engine


MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen and when generation stops. temperature 0 means greedy (the argmax
    after penalties, bias and min_tokens). `logprobs` / `prompt_logprobs`: how many top
    alternatives to report per generated / prompt token (None: none). `prior_output_tokens`:
    trailing prompt tokens generated earlier (a resumed request): the penalties and min_tokens
    count them as output."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: disabled
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # vLLM's (CTRL's): divides positive logits of prompt and output tokens
    min_p: float = 0.0  # drop tokens below min_p x the most likely token's probability
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0  # EOS and stop tokens are masked until this many were generated
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    prior_output_tokens: int = 0
    grammar: Grammar | None = None  # structured output (engine/grammar.py)

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidRequestError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequestError(f"seed must be in [0, 2**63), got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not 0.0 < self.repetition_penalty <= 100.0:
            raise InvalidRequestError(f"repetition_penalty must be in (0, 100], got {self.repetition_penalty!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not 0 <= self.min_tokens <= self.max_tokens + self.prior_output_tokens:
            raise InvalidRequestError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= MAX_LOGPROBS:
                raise InvalidRequestError(f"{name} must be in [0, {MAX_LOGPROBS}], got {v!r}")
        if any(not -100.0 <= b <= 100.0 for b in self.logit_bias.values()):
            raise InvalidRequestError("logit_bias values must be in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def shapes_logits(self) -> bool:
        """Whether the logits change before sampling (penalties, bias; min_tokens is per step)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens or self.grammar is not None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop_token_ids"] = list(self.stop_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingParams":
        d = dict(d)
        d["stop_token_ids"] = tuple(d.get("stop_token_ids", ()))
        d["logit_bias"] = {int(k): float(v) for k, v in (d.get("logit_bias") or {}).items()}
        g = d.get("grammar")
        if isinstance(g, dict):
            d["grammar"] = Grammar(**g)
        return cls(**d)


@dataclass
class Request:
    """One generation request. `token_ids` holds the prompt followed by the output so far."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    sampling: SamplingParams
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    # Tokens whose KV is in the cache. A running request in decode has len(token_ids) - 1:
    # the last sampled token is fed in the next step.
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    generator: torch.Generator | None = None
    # Prefix caching (engine/block_hash.py): the chain's root (None: this request is not cached),
    # the hashes of its full blocks as far as computed, and how many of its leading blocks were
    # offered to the cache (registered, or found there).
    cache_salt: str = ""
    hash_root: int | None = None
    block_hashes: list[int] = field(default_factory=list)
    num_registered_blocks: int = 0
    # sampling.prompt_logprobs: one entry per prompt token computed so far (the first None),
    # handed out with the first output token.
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    # sampling.grammar: its llguidance matcher, advanced by every output token (rebuilt by replay
    # wherever the request goes: engine/grammar.py)
    matcher: Any = None

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked for and not handed out yet (its prefill must compute every token)."""
        return self.sampling.prompt_logprobs is not None and self.num_output_tokens == 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def sort_key(self) -> tuple[int, float]:
        """Lower is served first and preempted last."""
        return (self.priority, self.arrival_time)

    # ---- migratable state -------------------------------------------------------------

    def export_state(self) -> MigratableState:
        """The request's migratable state (no tensors: the generator's state as bytes)."""
        return export_state(self.request_id, self.token_ids, self.num_prompt_tokens, self.num_computed_tokens,
                            self.sampling, self.priority, self.num_preemptions, self.arrival_time,
                            bytes(self.generator.get_state().numpy().tobytes()) if self.generator else None,
                            cache_salt=self.cache_salt)

    @classmethod
    def from_state(cls, state: MigratableState, device: torch.device) -> "Request":
        """Rebuild a request exported by `export_state` (possibly by another process)."""
        try:
            check_version(state)
            sampling = sampling_of(state)
            gen = None
            if state.generator_state is not None:
                gen = torch.Generator(device=device)
                gen.set_state(torch.frombuffer(bytearray(state.generator_state), dtype=torch.uint8))
            req = cls(
                request_id=state.request_id,
                token_ids=list(state.token_ids),
                num_prompt_tokens=state.num_prompt_tokens,
                sampling=sampling,
                priority=state.priority,
                arrival_time=time.monotonic() - state.age_s,
                num_computed_tokens=state.num_computed_tokens,
                num_preemptions=state.num_preemptions,
                generator=gen,
                cache_salt=state.cache_salt,
            )
        except MigrationError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise MigrationError(f"invalid request state: {exc!r}") from exc
        if not 0 <= req.num_computed_tokens < req.num_tokens or req.num_prompt_tokens > req.num_tokens:
            raise MigrationError("request state has inconsistent token counts")
        return req


def export_state(request_id: str, token_ids: list[int], num_prompt_tokens: int, num_computed_tokens: int,
                 sampling: SamplingParams, priority: int, num_preemptions: int, arrival_time: float,
                 generator_state: bytes | None, cache_salt: str = "") -> MigratableState:
    """One request's MigratableState, from any engine's own request record."""
    try:
        return MigratableState(
            state_version=STATE_VERSION, request_id=request_id, token_ids=list(token_ids),
            num_prompt_tokens=num_prompt_tokens, num_computed_tokens=num_computed_tokens,
            sampling=WireSamplingParams.from_engine(sampling), priority=priority, num_preemptions=num_preemptions,
            age_s=max(0.0, time.monotonic() - arrival_time), generator_state=generator_state,
            cache_salt=cache_salt)
    except ValueError as exc:  # the struct's own consistency checks
        raise MigrationError(f"cannot export {request_id!r}: {exc}") from exc


def check_version(state: MigratableState) -> None:
    if state.state_version != STATE_VERSION:
        raise MigrationError(f"request state version {state.state_version!r} != {STATE_VERSION}")


def sampling_of(state: MigratableState) -> SamplingParams:
    """The engine's SamplingParams of a migrated request."""
    return SamplingParams.from_dict(state.sampling.to_dict())


def make_generator(sampling: SamplingParams, device: torch.device) -> torch.Generator | None:
    """Every sampling request owns a generator (seeded or not) so its state can migrate."""
    if sampling.greedy:
        return None
    gen = torch.Generator(device=device)
    seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    gen.manual_seed(seed)
    return gen


@dataclass
class RequestOutput:
    """New tokens of one request after a step. `first_index` is the output index of
    new_token_ids[0], so a consumer can stitch streams from several owners without gaps."""

    request_id: str
    new_token_ids: list[int]
    first_index: int
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None
    logprobs: list[TokenLogprobs] | None = None  # one per new token, when the request asked
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # with the first token, when asked
