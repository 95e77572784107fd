"""Sampling controls and logprobs in the torch engine, against independent references.

transformers' Llama on the same random weights is the oracle: its log_softmax gives the logprobs
of every prompt and output token, and a greedy decode that applies OpenAI's / vLLM's documented
penalty formulas (written out here, not imported from the engine) gives the tokens the engine
must choose with penalties, logit_bias and min_tokens.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.errors import InvalidRequestError, MigrationError

pytest.importorskip("transformers")

NEW = 12


def prompt(vocab: int, n: int, seed: int = 3) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine(path, **cfg) -> LLMEngine:  # noqa: ANN001
    return LLMEngine.from_model(str(path), EngineConfig(**{"dtype": "float32", "debug_checks": True, **cfg}))


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:  # noqa: ANN001
    """[len(ids), vocab]: log_softmax of transformers' logits at every position."""
    with torch.no_grad():
        logits = hf.model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def reference_shaped_greedy(hf, ids: list[int], sp: SamplingParams, eos: set[int]) -> list[int]:  # noqa: ANN001
    """transformers' greedy decode with the penalties applied as OpenAI and vLLM document them."""
    ids = list(ids)
    n_prompt = len(ids)
    for _ in range(sp.max_tokens):
        with torch.no_grad():
            x = hf.model(torch.tensor([ids])).logits[0, -1].double()
        out = ids[n_prompt:]
        for t, b in sp.logit_bias.items():  # vLLM applies the bias and min_tokens before the penalties
            x[t] += b
        if len(out) < sp.min_tokens:
            for t in eos | set(sp.stop_token_ids):
                x[t] = -math.inf
        for t in set(ids):  # repetition penalty: prompt and output tokens
            x[t] = x[t] / sp.repetition_penalty if x[t] > 0 else x[t] * sp.repetition_penalty
        for t in set(out):
            x[t] -= sp.frequency_penalty * out.count(t) + sp.presence_penalty
        ids.append(int(x.argmax()))
    return ids[n_prompt:]


@pytest.mark.parametrize("chunk", [0, 7], ids=["one-prefill", "chunked"])
def test_logprobs_and_prompt_logprobs_equal_transformers(hf_llama, chunk):
    """Greedy with logprobs=5 and prompt_logprobs=3: every token's logprob, rank and top-k equal
    transformers' log_softmax to 1e-4 (float32), prefilled whole or in chunks of 7."""
    vocab = hf_llama.config["vocab_size"]
    p = prompt(vocab, 30)
    cfg = {"max_num_batched_tokens": chunk} if chunk else {}
    eng = engine(hf_llama.path, **cfg)
    req = eng.add_request("lp", p, SamplingParams(max_tokens=NEW, ignore_eos=True, logprobs=5, prompt_logprobs=3))
    outs = []
    while not req.is_finished:
        outs += [o for o in eng.step() if o.request_id == "lp"]
    ref = hf_logprobs(hf_llama, req.token_ids)
    first = outs[0]
    assert first.prompt_logprobs is not None and len(first.prompt_logprobs) == len(p)
    assert first.prompt_logprobs[0] is None and all(o.prompt_logprobs is None for o in outs[1:])
    entries = [(i, e) for i, e in enumerate(first.prompt_logprobs) if e is not None]
    entries += [(len(p) + j, o.logprobs[0]) for j, o in enumerate(outs)]
    for pos, e in entries:  # token at `pos`, predicted from position pos - 1
        row, tok = ref[pos - 1], req.token_ids[pos]
        assert e.logprob == pytest.approx(row[tok].item(), abs=1e-4)
        assert e.rank == int((row > row[tok]).sum()) + 1
        want = torch.topk(row, len(e.top_ids))
        assert e.top_ids == want.indices.tolist()
        assert e.top_logprobs == pytest.approx(want.values.tolist(), abs=1e-4)
    assert [len(e.top_ids) for _, e in entries] == [3] * (len(p) - 1) + [5] * NEW
    assert all(o.logprobs[0].rank == 1 for o in outs)  # greedy picks the most likely raw token
    assert eng.blocks.num_used == 0


def test_prompt_logprobs_skip_the_prefix_cache_and_survive_preemption(hf_llama):
    """A second identical prompt with prompt_logprobs computes every token again (a cached prefix
    has no logits) and gets the same entries; a tiny pool forces preemption by recompute, which
    repeats no entry."""
    p = prompt(hf_llama.config["vocab_size"], 40, seed=5)
    sp = SamplingParams(max_tokens=4, ignore_eos=True, prompt_logprobs=1)
    eng = engine(hf_llama.path, prefix_caching=True, block_size=4)
    a = eng.generate([p], SamplingParams(max_tokens=4, ignore_eos=True))[0]  # fills the cache
    assert eng.blocks.num_cached > 0
    got = []
    for rid in ("b", "c"):
        eng.add_request(rid, p, sp)
        while True:
            outs = [o for o in eng.step() if o.request_id == rid]
            if outs and outs[0].prompt_logprobs is not None:
                got.append(outs[0].prompt_logprobs)
            if rid not in eng.requests:
                break
    assert len(got) == 2 and got[0] == got[1] and len(got[0]) == len(p)
    assert a.is_finished


def test_a_request_computing_prompt_logprobs_does_not_migrate_mid_prefill(hf_llama):
    p = prompt(hf_llama.config["vocab_size"], 40)
    eng = engine(hf_llama.path, max_num_batched_tokens=8)
    eng.add_request("pl", p, SamplingParams(max_tokens=2, prompt_logprobs=0))
    eng.step()
    assert 0 < eng.requests["pl"].num_computed_tokens < len(p)
    with pytest.raises(MigrationError, match="prompt logprobs"):
        eng.detach_request("pl")
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.blocks.num_used == 0


@pytest.mark.parametrize("sp", [
    SamplingParams(max_tokens=NEW, frequency_penalty=1.5),
    SamplingParams(max_tokens=NEW, presence_penalty=2.0),
    SamplingParams(max_tokens=NEW, presence_penalty=-1.0, frequency_penalty=0.5),
    SamplingParams(max_tokens=NEW, repetition_penalty=1.8),
    SamplingParams(max_tokens=NEW, repetition_penalty=0.7),
    SamplingParams(max_tokens=NEW, logit_bias={11: 5.0, 12: -100.0}),
    SamplingParams(max_tokens=NEW, logit_bias={0: 100.0}, min_tokens=5, stop_token_ids=(0,)),
], ids=["frequency", "presence", "both", "repetition", "repetition-below-1", "bias", "min-tokens"])
def test_shaped_greedy_equals_the_documented_formulas(hf_llama, sp):
    p = prompt(hf_llama.config["vocab_size"], 20, seed=9)
    eng = engine(hf_llama.path)
    req = eng.generate([p], sp)[0]
    want = reference_shaped_greedy(hf_llama, p, sp, set())
    if sp.stop_token_ids:  # token 0 is forced by its bias once min_tokens allows it, and stops the answer
        assert req.output_token_ids == want[:sp.min_tokens + 1] and want[sp.min_tokens] == 0
        assert req.finish_reason.value == "stop"
    else:
        assert req.output_token_ids == want
    plain = eng.generate([p], SamplingParams(max_tokens=NEW))[0]
    assert plain.output_token_ids != want or sp.min_tokens  # each control changed the answer


def test_min_tokens_masks_eos_and_min_p_one_is_greedy():
    """min_tokens keeps a likely EOS off until it is reached; min_p = 1 leaves only the most likely token."""
    eng = LLMEngine.from_model("tiny", EngineConfig(dtype="float32"))
    eos = sorted(eng.scheduler.eos_token_ids)[0]
    forced = SamplingParams(max_tokens=20, logit_bias={eos: 100.0}, min_tokens=6)
    r = eng.generate([[1, 2, 3]], forced)[0]
    assert len(r.output_token_ids) == 7 and r.output_token_ids[-1] == eos and eos not in r.output_token_ids[:-1]
    g = eng.generate([[5, 6, 7]], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    m = eng.generate([[5, 6, 7]], SamplingParams(max_tokens=10, temperature=1.5, min_p=1.0, seed=3,
                                                 ignore_eos=True))[0]
    assert m.output_token_ids == g.output_token_ids


def test_prior_output_tokens_count_as_output_for_penalties_and_min_tokens(hf_llama):
    """A request resumed by recompute (its earlier output now ends its prompt) keeps choosing as
    the uninterrupted one: prior_output_tokens makes the penalties and min_tokens see that output."""
    p = prompt(hf_llama.config["vocab_size"], 15, seed=4)
    sp = SamplingParams(max_tokens=NEW, frequency_penalty=1.2, presence_penalty=0.5)
    eng = engine(hf_llama.path)
    whole = eng.generate([p], sp)[0].output_token_ids
    k = 5
    resumed = eng.generate([p + whole[:k]], SamplingParams(max_tokens=NEW - k, frequency_penalty=1.2,
                                                           presence_penalty=0.5, prior_output_tokens=k))[0]
    assert whole[:k] + resumed.output_token_ids == whole


@pytest.mark.parametrize("bad", [
    dict(presence_penalty=2.5), dict(frequency_penalty=-3.0), dict(repetition_penalty=0.0), dict(min_p=1.5),
    dict(min_tokens=20, max_tokens=10), dict(logprobs=21), dict(prompt_logprobs=-1), dict(logit_bias={10**6: 1.0}),
    dict(logit_bias={1: 101.0}),
])
def test_bad_sampling_values_are_refused_and_nothing_is_queued(bad):
    eng = LLMEngine.from_model("tiny", EngineConfig(dtype="float32"))
    with pytest.raises(InvalidRequestError):
        eng.add_request("bad", [1, 2], SamplingParams(**bad))
    assert not eng.requests and eng.blocks.num_used == 0


def test_the_sim_engine_refuses_logprobs():
    from engine.sim.latency import INSTANT

    eng = LLMEngine.sim(INSTANT, clock="virtual")
    with pytest.raises(InvalidRequestError, match="logprobs"):
        eng.add_request("x", [1, 2, 3], SamplingParams(logprobs=1))


# ---- structured output ----------------------------------------------------------------------------

def smol() -> LLMEngine:
    return LLMEngine.from_model("smollm2", EngineConfig(dtype="float32", num_blocks=512))


@pytest.fixture(scope="module")
def smol_engine() -> LLMEngine:
    return smol()


def grammar(kind: str, spec):  # noqa: ANN001, ANN201 - protocol.payloads.Grammar
    import json

    from protocol.payloads import Grammar

    return Grammar(kind=kind, spec=spec if isinstance(spec, str) else json.dumps(spec))


def chat_ids(eng: LLMEngine, text: str) -> list[int]:
    return eng.tokenizer.encode_chat([{"role": "user", "content": text}])


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_json_schema_output_parses_validates_and_survives_migration(smol_engine, kind):
    """SmolLM2 answers under the schema's mask: valid JSON that validates; moved to a second engine
    (its matcher rebuilt there by replaying the output) after 5 tokens, the answer is the same."""
    import json

    import jsonschema

    eng = smol_engine
    sp = SamplingParams(max_tokens=60, grammar=grammar("json_schema", SCHEMA),
                        **({"temperature": 0.8, "seed": 5} if kind == "seeded" else {}))
    p = chat_ids(eng, "Describe a person as JSON.")
    whole = eng.generate([p], sp)[0]
    text = eng.tokenizer.decode(whole.output_token_ids)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert whole.finish_reason.value == "stop"

    other = smol()
    eng.add_request("mv", p, sp)
    for _ in range(6):
        eng.step()
    state = eng.remove_request("mv")
    assert 0 < len(state.token_ids) - state.num_prompt_tokens < len(whole.output_token_ids)
    moved = other.commit_request(state.with_computed(0), None)  # recompute there: the matcher replays
    while other.has_unfinished_requests():
        other.step()
    assert moved.output_token_ids == whole.output_token_ids


def test_regex_choice_and_lark_constrain_the_answer(smol_engine):
    eng = smol_engine
    p = chat_ids(eng, "Is the sky blue? Answer.")
    for g, check in ((grammar("regex", r"(yes|no), because [a-z ]{5,30}\."),
                      lambda t: t.startswith(("yes, because ", "no, because ")) and t.endswith(".")),
                     (grammar("lark", 'start: "maybe" | "certainly"'), lambda t: t in ("maybe", "certainly")),
                     (grammar("lark", 'start: "Answer: " num\nnum: /[0-9]{1,3}/'),
                      lambda t: t.startswith("Answer: ") and t[8:].isdigit())):
        r = eng.generate([p], SamplingParams(max_tokens=40, grammar=g))[0]
        text = eng.tokenizer.decode(r.output_token_ids)
        assert check(text), (g, text)


def test_a_bad_grammar_is_an_invalid_request_and_nothing_is_queued(smol_engine):
    eng = smol_engine
    for g in (grammar("regex", "[a-z"), grammar("lark", "start: undefined_rule"),
              grammar("json_schema", "{not json")):
        with pytest.raises(InvalidRequestError):
            eng.add_request("bad", [1, 2, 3], SamplingParams(grammar=g))
    assert not eng.requests and eng.blocks.num_used == 0


def test_a_resumed_grammar_request_replays_its_earlier_output(smol_engine):
    """Resumption by recompute: the delivered tokens end the new prompt (prior_output_tokens); the
    matcher consumes them first, so the rest of the answer is the uninterrupted one's."""
    eng = smol_engine
    sp = SamplingParams(max_tokens=60, grammar=grammar("json_schema", SCHEMA))
    p = chat_ids(eng, "A person, in JSON.")
    whole = eng.generate([p], sp)[0].output_token_ids
    k = 4
    rest = eng.generate([p + whole[:k]], SamplingParams(max_tokens=60 - k, grammar=sp.grammar,
                                                        prior_output_tokens=k))[0].output_token_ids
    assert whole[:k] + rest == whole
