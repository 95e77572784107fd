"""A request inside the engine: its tokens, sampling parameters and migratable state."""

from __future__ import annotations

import enum
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from engine.errors import InvalidRequestError, MigrationError
from protocol.payloads import MigratableState
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


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen and when generation stops. temperature 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: disabled
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop_token_ids"] = list(self.stop_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingParams":
        d = dict(d)
        d["stop_token_ids"] = tuple(d.get("stop_token_ids", ()))
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
