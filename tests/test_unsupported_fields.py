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
    "functions": [TOOL["function"]], "function_call": "auto", "structural_tag": "{}", "bad_words": ["x"], "allowed_token_ids": [1, 2],
    "use_beam_search": True, "length_penalty": 0.5, "truncate_prompt_tokens": 5, "skip_special_tokens": False,
    "spaces_between_special_tokens": False, "return_tokens_as_token_ids": True, "chat_template": "{{ messages }}", "chat_template_kwargs": {"x": 1},
    "documents": [{"text": "d"}], "mm_processor_kwargs": {"a": 1}, "audio": {"voice": "alloy"},
    "modalities": ["text", "audio"], "prediction": {"type": "content", "content": "x"},
}
# field -> values that ask for nothing
NOTHING: dict[str, list[Any]] = {
    "tools": [None, []], "tool_choice": [None, "none"], "response_format": [None, {"type": "text"}],
    "guided_json": [None], "structured_outputs": [None, {}, {"json": None}], "skip_special_tokens": [True], "add_generation_prompt": [True],
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


def test_continuous_usage_stats_is_implemented_and_legacy_function_calls_in_messages_are_refused():
    p = PARSER.chat({**CHAT, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    assert p.continuous_usage and p.include_usage
    with pytest.raises(ApiError) as err:
        PARSER.chat({**CHAT, "stream": True, "stream_options": {"continuous_usage_stats": "yes"}})
    assert err.value.param == "stream_options"
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}]
    with pytest.raises(ApiError) as err:
        PARSER.chat({**CHAT, "messages": msgs})
    assert err.value.param == "messages[1].function_call" and err.value.code == "unsupported_parameter"


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


def test_structured_output_fields_become_one_grammar():
    import json

    from protocol.payloads import Grammar

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    cases = [
        ({"response_format": {"type": "json_object"}}, Grammar(kind="json_schema", spec='{"type": "object"}')),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}},
         Grammar(kind="json_schema", spec=json.dumps(schema))),
        ({"guided_json": json.dumps(schema)}, Grammar(kind="json_schema", spec=json.dumps(schema))),
        ({"guided_regex": "[a-z]+"}, Grammar(kind="regex", spec="[a-z]+")),
        ({"guided_choice": ["yes", 'say "no"']}, Grammar(kind="lark", spec='start: "yes" | "say \\"no\\""')),
        ({"guided_grammar": 'start: "a"'}, Grammar(kind="lark", spec='start: "a"')),
        ({"structured_outputs": {"regex": "x+"}}, Grammar(kind="regex", spec="x+")),
        ({"structured_outputs": {"json_object": True}}, Grammar(kind="json_schema", spec='{"type": "object"}')),
    ]
    for extra, want in cases:
        assert PARSER.chat({**CHAT, **extra}).sampling.grammar == want, extra
        assert PARSER.completion({**COMPLETION, **extra}).sampling.grammar == want, extra


@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": "{bad"}}}, "response_format"),
    ({"guided_regex": "[a-z"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_grammar": "start: nothing_here"}, "guided_grammar"),
    ({"guided_json": 5}, "guided_json"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs"),
])
def test_bad_structured_output_gets_a_400_naming_the_field(extra, param):
    with pytest.raises(ApiError) as err:
        PARSER.chat({**CHAT, **extra})
    assert err.value.status == 400 and err.value.param == param, err.value.message


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


def test_tools_go_into_the_prompt_and_forced_choices_into_a_grammar():
    from services.frontend.tools import OPEN

    auto = PARSER.chat({**CHAT, "tools": [WEATHER]})
    prompt = TOK.decode(auto.prompt_ids)
    assert "get_weather" in prompt and "<tools>" in prompt and auto.sampling.grammar is None
    assert auto.tools.names == {"get_weather"} and auto.tools.choice == "auto"
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        p = PARSER.chat({**CHAT, "tools": [WEATHER], "tool_choice": choice})
        assert p.sampling.grammar.kind == "lark" and OPEN in p.sampling.grammar.spec and "%json" in p.sampling.grammar.spec
    none = PARSER.chat({**CHAT, "tools": [WEATHER], "tool_choice": "none"})
    assert none.tools is None and "get_weather" not in TOK.decode(none.prompt_ids)
    history = [{"role": "user", "content": "weather in Oslo?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    text = TOK.decode(PARSER.chat({**CHAT, "messages": history, "tools": [WEATHER]}).prompt_ids)
    assert '"name": "get_weather", "arguments": {"city": "Oslo"}' in text and "<tool_response>\nsunny" in text


@pytest.mark.parametrize("extra,param", [
    ({"tools": "x"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0]"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}]},
     "messages[0].tool_calls"),
])
def test_bad_tools_get_a_400_naming_the_field(extra, param):
    with pytest.raises(ApiError) as err:
        PARSER.chat({**CHAT, **extra})
    assert err.value.status == 400 and err.value.param == param, err.value.message


def test_tool_calls_are_parsed_out_of_whole_and_streamed_answers():
    from services.frontend.tools import ToolCallStream, split_calls

    names = {"get_weather"}
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    content, calls = split_calls(text, names)
    assert content == "Let me check." and len(calls) == 1
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    assert split_calls("no calls <tool_call>{oops}</tool_call>", names) == ("no calls <tool_call>{oops}</tool_call>", [])
    assert split_calls('<tool_call>{"name": "unknown", "arguments": {}}</tool_call>', names)[1] == []
    for step in (1, 3, 7, len(text)):  # any split of the stream gives the same content and calls
        s = ToolCallStream(names)
        got, got_calls = "", []
        for i in range(0, len(text), step):
            c, cs = s.feed(text[i:i + step])
            got += c
            got_calls += cs
        got += s.finish()
        assert got.strip() == "Let me check." and [c["function"] for c in got_calls] == [calls[0]["function"]]
        assert got_calls[0]["index"] == 0


def test_a_template_with_a_tools_section_renders_tools_and_calls_itself():
    from engine.tokenizer import Tokenizer

    template = ("{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}"
                "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% for c in m.tool_calls or [] %}"
                "CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}{% endfor %}")
    tok = Tokenizer(TOK.backend, TOK.eos_token_ids, chat_template=template)
    parser = RequestParser(FrontendConfig(), tok, "tiny", (), max_context=4096)
    history = [{"role": "user", "content": "weather in Oslo?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    text = tok.decode(parser.chat({**CHAT, "messages": history, "tools": [WEATHER]}).prompt_ids)
    assert text == ('<tools>get_weather;</tools>[user]weather in Oslo?[assistant]CALL get_weather {"city": "Oslo"}'
                    "[tool]sunny")


def test_add_generation_prompt_false_and_continue_final_message():
    """vLLM's: no assistant header at the end; or the last (assistant) message left open to go on with."""
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I am"}]
    plain = TOK.decode(PARSER.chat({**CHAT, "messages": msgs}).prompt_ids)
    no_gen = TOK.decode(PARSER.chat({**CHAT, "messages": msgs, "add_generation_prompt": False}).prompt_ids)
    cont = TOK.decode(PARSER.chat({**CHAT, "messages": msgs, "continue_final_message": True,
                                   "add_generation_prompt": False}).prompt_ids)
    assert plain.startswith(no_gen) and len(plain) > len(no_gen)
    assert cont.endswith("Hello, I am") and no_gen.startswith(cont) and len(no_gen) > len(cont)
    assert TOK.decode(PARSER.chat({**CHAT, "messages": msgs, "continue_final_message": True}).prompt_ids) == cont
    for extra, param in (({"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
                         ({"continue_final_message": True, "add_generation_prompt": False,
                           "messages": [{"role": "user", "content": "x"}]}, "continue_final_message"),
                         ({"add_generation_prompt": "no"}, "add_generation_prompt")):
        with pytest.raises(ApiError) as err:
            PARSER.chat({**CHAT, "messages": msgs, **extra})
        assert err.value.param == param, extra
