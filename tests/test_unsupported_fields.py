"""A request field is implemented or refused with a 400 naming it, never accepted and ignored
(services.frontend.params.UNSUPPORTED): each field of OpenAI's and vLLM's request that asks for
something this server does not do, on completions and chat; the values that ask for nothing pass."""

from __future__ import annotations

from typing import Any

import pytest

from services.config import FrontendConfig
from services.frontend.params import UNSUPPORTED, ApiError, RequestParser
from tests.test_frontend_http import TOK

PARSER = RequestParser(FrontendConfig(), TOK, "tiny", (), max_context=1024)
COMPLETION = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}

# field -> a value that asks for something (as real clients send it)
ASKING: dict[str, Any] = {
    "tools": [TOOL], "tool_choice": "required", "functions": [TOOL["function"]], "function_call": "auto",
    "response_format": {"type": "json_object"}, "guided_json": {"type": "object"}, "guided_regex": "[a-z]+",
    "guided_choice": ["yes", "no"], "guided_grammar": "root ::= \"a\"", "structured_outputs": {"json": {}},
    "structural_tag": "{}", "bad_words": ["x"], "allowed_token_ids": [1, 2],
    "use_beam_search": True, "length_penalty": 0.5, "truncate_prompt_tokens": 5, "skip_special_tokens": False,
    "spaces_between_special_tokens": False, "return_tokens_as_token_ids": True, "continue_final_message": True,
    "add_generation_prompt": False, "chat_template": "{{ messages }}", "chat_template_kwargs": {"x": 1},
    "documents": [{"text": "d"}], "mm_processor_kwargs": {"a": 1}, "audio": {"voice": "alloy"},
    "modalities": ["text", "audio"], "prediction": {"type": "content", "content": "x"},
}
# field -> values that ask for nothing
NOTHING: dict[str, list[Any]] = {
    "tools": [None, []], "tool_choice": [None, "none"], "response_format": [None, {"type": "text"}],
    "skip_special_tokens": [True], "add_generation_prompt": [True],
    "modalities": [["text"]], "continue_final_message": [False],
}


def test_the_table_covers_every_asking_value():
    assert set(ASKING) == set(UNSUPPORTED)


@pytest.mark.parametrize("name", sorted(ASKING))
@pytest.mark.parametrize("endpoint", ["completion", "chat"])
def test_a_field_that_asks_for_what_is_not_done_is_refused_by_name(name: str, endpoint: str):
    body = {**(COMPLETION if endpoint == "completion" else CHAT), name: ASKING[name]}
    with pytest.raises(ApiError) as err:
        getattr(PARSER, endpoint)(body)
    e = err.value
    assert e.status == 400 and e.param == name and e.code == "unsupported_parameter"
    assert f"'{name}'" in e.message and "not supported" in e.message
    assert set(e.body()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("name", sorted(NOTHING))
def test_a_field_that_asks_for_nothing_is_accepted(name: str):
    for value in NOTHING[name]:
        assert PARSER.chat({**CHAT, name: value}).sampling.max_tokens == 8
        assert PARSER.completion({**COMPLETION, name: value}).prompt_ids


def test_fields_without_an_effect_on_the_answer_pass():
    body = {**CHAT, "user": "u-1", "metadata": {"k": "v"}, "store": False, "parallel_tool_calls": True}
    assert PARSER.chat(body).prompt_ids


def test_continuous_usage_stats_and_tool_calls_in_messages_are_refused():
    with pytest.raises(ApiError) as err:
        PARSER.chat({**CHAT, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    assert err.value.param == "stream_options" and err.value.code == "unsupported_parameter"
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                                    "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    with pytest.raises(ApiError) as err:
        PARSER.chat({**CHAT, "messages": msgs})
    assert err.value.param == "messages[1].tool_calls" and err.value.code == "unsupported_parameter"


def test_stop_token_ids_are_implemented():
    p = PARSER.completion({**COMPLETION, "stop_token_ids": [10, 11, 10]})
    assert p.sampling.stop_token_ids == [10, 11]
    assert PARSER.chat({**CHAT, "stop_token_ids": []}).sampling.stop_token_ids == []
    for bad_value, code in (("10", "invalid_type"), ([1.5], "invalid_type"), ([True], "invalid_type"),
                            ([-1], "invalid_value"), ([TOK.vocab_size], "invalid_value"),
                            (list(range(1025)), "invalid_value")):
        with pytest.raises(ApiError) as err:
            PARSER.completion({**COMPLETION, "stop_token_ids": bad_value})
        assert err.value.param == "stop_token_ids" and err.value.code == code, bad_value


def test_n_and_a_batch_of_prompts_make_one_choice_each():
    p = PARSER.completion({**COMPLETION, "prompt": ["a", [5, 6], "bc"], "n": 2, "seed": 40})
    ch = p.choices()
    assert [ids for ids, _ in ch] == [TOK.encode("a")] * 2 + [[5, 6]] * 2 + [TOK.encode("bc")] * 2
    assert [sp.seed for _, sp in ch] == [40, 41] * 3
    assert [sp.seed for _, sp in PARSER.chat({**CHAT, "n": 3}).choices()] == [None] * 3  # unseeded stays unseeded
    assert len(PARSER.completion(COMPLETION).choices()) == 1
    top = PARSER.completion({**COMPLETION, "n": 2, "seed": (1 << 63) - 1}).choices()
    assert [sp.seed for _, sp in top] == [(1 << 63) - 1, 0]  # wraps within the seed's range
    for body, param in (({**COMPLETION, "n": 0}, "n"), ({**COMPLETION, "n": 65}, "n"),
                        ({**COMPLETION, "prompt": ["a"] * 65}, "prompt"), ({**COMPLETION, "prompt": ["a", 5]}, "prompt"),
                        ({**COMPLETION, "prompt": ["a", ""]}, "prompt"), ({**COMPLETION, "prompt": ["a"] * 9, "n": 8}, "n")):
        with pytest.raises(ApiError) as err:
            PARSER.completion(body)
        assert err.value.status == 400 and err.value.param == param, body


def test_sampling_controls_reach_the_engine_parameters():
    body = {**COMPLETION, "presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": 1.3, "min_p": 0.05,
            "min_tokens": 3, "logit_bias": {"5": 100, "7": -2.5}, "include_stop_str_in_output": True,
            "logprobs": 4, "echo": True, "prompt_logprobs": 2}
    p = PARSER.completion(body)
    sp = p.sampling
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty, sp.min_p, sp.min_tokens) == \
        (0.5, -1.0, 1.3, 0.05, 3)
    assert sp.logit_bias == {5: 100.0, 7: -2.5} and p.include_stop_str
    assert (p.logprobs, p.echo, sp.logprobs, sp.prompt_logprobs, p.prompt_logprobs) == (4, True, 4, 4, 2)
    c = PARSER.chat({**CHAT, "logprobs": True, "top_logprobs": 3})
    assert (c.logprobs, c.sampling.logprobs, c.sampling.prompt_logprobs) == (3, 3, None)
    assert PARSER.chat({**CHAT, "logprobs": True}).logprobs == 0
    assert PARSER.chat({**CHAT, "logprobs": False}).sampling.logprobs is None
    zero = PARSER.completion({**COMPLETION, "max_tokens": 0, "echo": True, "logprobs": 1})
    assert zero.no_output and zero.sampling.max_tokens == 1 and zero.sampling.prompt_logprobs == 1
    best = PARSER.completion({**COMPLETION, "n": 2, "best_of": 5})
    assert (best.n, best.best_of, best.sampling.logprobs, len(best.choices())) == (2, 5, 0, 5)
    assert best.logprobs is None  # computed to rank the samples, not answered


@pytest.mark.parametrize("endpoint,extra,param", [
    ("completion", {"presence_penalty": 2.5}, "presence_penalty"),
    ("completion", {"frequency_penalty": "high"}, "frequency_penalty"),
    ("completion", {"repetition_penalty": 0}, "repetition_penalty"),
    ("completion", {"min_p": 1.5}, "min_p"),
    ("completion", {"min_tokens": 9}, "min_tokens"),  # > max_tokens
    ("completion", {"min_tokens": -1}, "min_tokens"),
    ("completion", {"logit_bias": {"x": 1}}, "logit_bias"),
    ("completion", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("completion", {"logit_bias": {str(10**7): 1}}, "logit_bias"),
    ("completion", {"logit_bias": [1, 2]}, "logit_bias"),
    ("completion", {"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
    ("completion", {"logprobs": 21}, "logprobs"),
    ("completion", {"logprobs": True}, "logprobs"),
    ("completion", {"echo": "yes"}, "echo"),
    ("completion", {"max_tokens": 0}, "max_tokens"),  # only with echo
    ("completion", {"best_of": 1, "n": 2}, "best_of"),
    ("completion", {"best_of": 3, "stream": True}, "best_of"),
    ("completion", {"prompt_logprobs": 30}, "prompt_logprobs"),
    ("completion", {"include_stop_str_in_output": 1}, "include_stop_str_in_output"),
    ("completion", {"suffix": "end"}, "suffix"),
    ("chat", {"logprobs": 5}, "logprobs"),
    ("chat", {"top_logprobs": 3}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"echo": True}, "echo"),
])
def test_bad_sampling_values_get_a_400_naming_the_field(endpoint: str, extra: dict, param: str):
    body = {**(COMPLETION if endpoint == "completion" else CHAT), **extra}
    with pytest.raises(ApiError) as err:
        getattr(PARSER, endpoint)(body)
    assert err.value.status == 400 and err.value.param == param, err.value.message
