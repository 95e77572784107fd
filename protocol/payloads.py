"""Value structs nested inside messages: sampling parameters, a migrating request's state,
tensor descriptors and worker endpoints. Not messages themselves (no type tag)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from protocol.fields import (
    INT64_MAX,
    MAX_BLOCKS,
    MAX_GENERATOR_STATE_BYTES,
    MAX_PROMPT_TOKENS,
    MAX_STOP_TOKENS,
    MAX_TENSOR_DIMS,
    MAX_TOKEN_ID,
    CacheSalt,
    Count,
    Endpoint,
    Id,
    Priority,
    TokenId,
    TokenIds,
)


MAX_LOGPROBS = 20  # top logprobs per token (OpenAI's limit)
MAX_LOGIT_BIAS = 1024  # entries of one request's logit_bias
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
TopLogprobs = Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)]


MAX_GRAMMAR_BYTES = 1 << 20


class Grammar(msgspec.Struct, kw_only=True, frozen=True):
    """Structured output: what the answer must match. `kind` "json_schema" (spec: the schema as
    JSON text), "regex" (the whole answer), or "lark" (llguidance's Lark dialect, which can embed
    JSON schemas with %json). The engine enforces it as a token mask (engine/grammar.py)."""

    kind: Literal["json_schema", "regex", "lark"]
    spec: Annotated[str, Meta(max_length=MAX_GRAMMAR_BYTES)]


class SamplingParams(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """Mirror of engine.request.SamplingParams with its value ranges enforced on decode.

    temperature 0 means greedy; top_k 0 disables top-k. Convert with `to_dict()` /
    `engine.request.SamplingParams.from_dict(...)` (the protocol does not import the engine).
    `logit_bias` maps token ids to additive biases; `logprobs` / `prompt_logprobs` ask for that
    many top alternatives per generated / prompt token (None: no logprobs). `prior_output_tokens`:
    how many trailing prompt tokens were generated earlier (a request resumed by recompute), which
    the penalties and min_tokens count as output.
    """

    max_tokens: Annotated[int, Meta(ge=1, le=MAX_PROMPT_TOKENS)] = 16
    temperature: Annotated[float, Meta(ge=0.0, le=100.0)] = 0.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Meta(ge=0, le=MAX_TOKEN_ID)] = 0
    seed: Annotated[int, Meta(ge=0, le=INT64_MAX)] | None = None
    stop_token_ids: Annotated[list[TokenId], Meta(max_length=MAX_STOP_TOKENS)] = []
    ignore_eos: bool = False
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=100.0)] = 1.0
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    logit_bias: Annotated[dict[TokenId, Annotated[float, Meta(ge=-100.0, le=100.0)]],
                          Meta(max_length=MAX_LOGIT_BIAS)] = {}
    min_tokens: Annotated[int, Meta(ge=0, le=MAX_PROMPT_TOKENS)] = 0
    logprobs: TopLogprobs | None = None
    prompt_logprobs: TopLogprobs | None = None
    prior_output_tokens: Annotated[int, Meta(ge=0, le=MAX_PROMPT_TOKENS)] = 0
    grammar: Grammar | None = None

    def to_dict(self) -> dict[str, Any]:
        """The keyword arguments of engine.request.SamplingParams (stop_token_ids as a list)."""
        return msgspec.structs.asdict(self)

    @classmethod
    def from_engine(cls, params: Any) -> "SamplingParams":
        """From an engine.request.SamplingParams (or anything with the same attributes)."""
        return cls(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                   top_k=params.top_k, seed=params.seed, stop_token_ids=list(params.stop_token_ids),
                   ignore_eos=params.ignore_eos, presence_penalty=params.presence_penalty,
                   frequency_penalty=params.frequency_penalty, repetition_penalty=params.repetition_penalty,
                   min_p=params.min_p, logit_bias=dict(params.logit_bias), min_tokens=params.min_tokens,
                   logprobs=params.logprobs, prompt_logprobs=params.prompt_logprobs,
                   prior_output_tokens=params.prior_output_tokens, grammar=params.grammar)


class TokenLogprobs(msgspec.Struct, frozen=True, array_like=True):
    """One token's log-probability (of the model's raw distribution: log_softmax of the logits,
    before temperature, penalties and masks, vLLM's `raw_logprobs`), its rank in that
    distribution (1: the most likely), and the top alternatives, most likely first."""

    logprob: float
    rank: Annotated[int, Meta(ge=1, le=MAX_TOKEN_ID + 1)]
    top_ids: Annotated[list[TokenId], Meta(max_length=MAX_LOGPROBS)] = []
    top_logprobs: Annotated[list[float], Meta(max_length=MAX_LOGPROBS)] = []

    def __post_init__(self) -> None:
        if len(self.top_ids) != len(self.top_logprobs):
            raise ValueError("top_ids and top_logprobs differ in length")


class MigratableState(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """A request's migratable state: what every engine's `detach_request` returns and
    `commit_request` takes, and what `MigrateCommit` carries between workers (one schema, no
    dict forms). Token counts are checked for consistency whenever one is built or decoded.
    """

    state_version: Annotated[int, Meta(ge=0, le=1 << 16)]
    request_id: Id
    token_ids: TokenIds
    num_prompt_tokens: Count
    num_computed_tokens: Count
    sampling: SamplingParams
    priority: Priority = 0
    num_preemptions: Count = 0
    age_s: Annotated[float, Meta(ge=0.0, le=1e9)] = 0.0
    generator_state: Annotated[bytes, Meta(max_length=MAX_GENERATOR_STATE_BYTES)] | None = None
    cache_salt: CacheSalt = ""  # the request shares cached KV only with requests of the same salt

    def __post_init__(self) -> None:
        # Raised as ValueError, msgspec turns this into a ValidationError during decode.
        if not self.token_ids:
            raise ValueError("request state has no tokens")
        if self.num_prompt_tokens > len(self.token_ids) or self.num_computed_tokens >= len(self.token_ids):
            raise ValueError("request state has inconsistent token counts")

    def with_computed(self, num_computed_tokens: int) -> "MigratableState":
        """The same state with another computed-token count (recompute mode moves 0)."""
        return msgspec.structs.replace(self, num_computed_tokens=num_computed_tokens)


# Fixed allow-list: names of torch dtypes whose every bit pattern is a valid value (no bool).
TensorDtype = Literal[
    "float32", "float16", "bfloat16", "float64", "float8_e4m3fn", "float8_e5m2",
    "int8", "uint8", "int16", "int32", "int64",
]


class TensorSpec(msgspec.Struct, kw_only=True, frozen=True, array_like=True):
    """dtype and shape of one tensor that travels as its own frame after the envelope."""

    dtype: TensorDtype
    shape: Annotated[list[Annotated[int, Meta(ge=0, le=MAX_BLOCKS << 16)]], Meta(max_length=MAX_TENSOR_DIMS)]


class WorkerEndpoints(msgspec.Struct, kw_only=True, frozen=True):
    """Where a worker listens. control: add/abort from frontends, commands from the scheduler;
    migration: worker-to-worker migration messages and KV frames."""

    control: Endpoint
    migration: Endpoint


class RequestLoadEntry(msgspec.Struct, kw_only=True, frozen=True, array_like=True):
    """One request in a load report (array-like: reports are frequent and this repeats).

    Field names match policy.snapshot.RequestLoad.
    """

    request_id: Id
    priority: Priority
    num_blocks: Count
    num_tokens: Count
    running: bool = True
