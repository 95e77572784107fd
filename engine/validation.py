"""Checks of a new request that every engine kind makes (kvferry's and the vLLM adapter)."""

from __future__ import annotations

from collections.abc import Container

from engine.errors import InvalidRequestError
from engine.request import SamplingParams


def check_new_request(request_id: object, prompt_token_ids: list[int], sampling: SamplingParams, priority: object,
                      live: Container[str], max_model_len: int, vocab_size: int) -> None:
    """InvalidRequestError naming what is wrong: the id (type, in use among `live`), priority,
    sampling parameters, or a prompt that is empty, too long for the context, or off the vocabulary."""
    sampling.validate()
    if not isinstance(request_id, str) or not request_id:
        raise InvalidRequestError(f"request id must be a non-empty string, got {request_id!r}")
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise InvalidRequestError(f"priority must be an integer, got {priority!r}")
    if request_id in live:
        raise InvalidRequestError(f"request id {request_id!r} is already in use")
    ids = prompt_token_ids
    if not ids:
        raise InvalidRequestError("the prompt is empty")
    if len(ids) >= max_model_len:
        raise InvalidRequestError(
            f"the prompt has {len(ids)} tokens; this model's context is {max_model_len} "
            f"(at most {max_model_len - 1} prompt tokens)")
    if any(type(t) is not int or not 0 <= t < vocab_size for t in ids):
        raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab_size})")
    if any(not 0 <= t < vocab_size for t in sampling.logit_bias):
        raise InvalidRequestError(f"logit_bias token ids must be in [0, {vocab_size})")
    if any(not 0 <= t < vocab_size for t in sampling.stop_token_ids):
        raise InvalidRequestError(f"stop_token_ids must be in [0, {vocab_size})")
