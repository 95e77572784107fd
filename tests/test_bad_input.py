"""Bad requests and bad weights: each is refused with the engine's own error naming the problem, and an
engine that refused a request keeps serving the others."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.errors import InvalidRequestError, WeightsError

CONTEXT = 64


@pytest.fixture(scope="module")
def tiny() -> LLMEngine:
    return LLMEngine.from_model("tiny", EngineConfig(dtype="float32", block_size=4, num_blocks=64,
                                                     max_model_len=CONTEXT, debug_checks=True))


@pytest.fixture
def eng(tiny):
    yield tiny
    for rid in list(tiny.requests):
        tiny.abort_request(rid)
    tiny.check_integrity()
    assert tiny.blocks.num_used == 0


@pytest.mark.parametrize("tokens,match", [
    ([1] * CONTEXT, rf"the prompt has {CONTEXT} tokens; this model's context is {CONTEXT}"),
    ([1] * 500, "the prompt has 500 tokens"),
    ([], "the prompt is empty"),
    ([1, -1, 2], r"prompt token ids must be integers in \[0, 259\)"),
    ([1, 259], r"prompt token ids must be integers in \[0, 259\)"),
    ([1, 2.0], "prompt token ids must be integers"),
    ([1, "2"], "prompt token ids must be integers"),
    ([None], "prompt token ids must be integers"),
    ([1, True], "prompt token ids must be integers"),
])
def test_bad_prompt_is_refused(eng, tokens, match):
    with pytest.raises(InvalidRequestError, match=match):
        eng.add_request("bad", tokens)
    assert "bad" not in eng.requests


@pytest.mark.parametrize("params,match", [
    (dict(max_tokens=0), "max_tokens must be an integer >= 1, got 0"),
    (dict(max_tokens=-3), "max_tokens must be an integer >= 1"),
    (dict(max_tokens=2.5), "max_tokens must be an integer >= 1"),
    (dict(temperature=-0.1), r"temperature must be in \[0, 100\], got -0.1"),
    (dict(temperature=1e9), r"temperature must be in \[0, 100\]"),
    (dict(temperature=float("nan")), r"temperature must be in \[0, 100\], got nan"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_p=float("nan")), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(seed=-1), r"seed must be in \[0, 2\*\*63\)"),
])
def test_bad_sampling_parameters_are_refused(eng, params, match):
    with pytest.raises(InvalidRequestError, match=match):
        eng.add_request("bad", [1, 2, 3], SamplingParams(**params))
    assert "bad" not in eng.requests


def test_duplicate_request_id_is_refused(eng):
    eng.add_request("same", [1, 2, 3])
    with pytest.raises(InvalidRequestError, match="request id 'same' is already in use"):
        eng.add_request("same", [4, 5])
    assert eng.requests["same"].prompt_token_ids == [1, 2, 3]


@pytest.mark.parametrize("kwargs,match", [
    (dict(request_id=""), "request id must be a non-empty string"),
    (dict(request_id=7), "request id must be a non-empty string, got 7"),
    (dict(priority="high"), "priority must be an integer, got 'high'"),
    (dict(priority=None), "priority must be an integer"),
    (dict(priority=1.5), "priority must be an integer"),
])
def test_bad_request_id_or_priority_is_refused(eng, kwargs, match):
    """Checked before the request is registered: a bad priority must not leave a half-queued request
    (it used to raise TypeError from the waiting queue's sort and stay in the registry)."""
    eng.add_request("queued", [1, 2, 3])  # a waiting request for a bad priority to be compared with
    args = {"request_id": "bad", "prompt_token_ids": [1, 2, 3], **kwargs}
    with pytest.raises(InvalidRequestError, match=match):
        eng.add_request(**args)
    assert set(eng.requests) == {"queued"}
    eng.check_integrity()


def test_generate_with_one_bad_prompt_queues_nothing(eng):
    """generate() is all or nothing: the valid prompts before a bad one are not left queued."""
    with pytest.raises(InvalidRequestError, match="the prompt is empty"):
        eng.generate([[1, 2], [3, 4], []])
    assert not eng.requests and not eng.has_unfinished_requests()
    eng.check_integrity()


def test_prompt_larger_than_the_kv_cache_is_refused():
    """A context window larger than the instance's cache: the prompt fits the model but not the pool."""
    small = LLMEngine.from_model("tiny", EngineConfig(dtype="float32", block_size=4, num_blocks=4))
    with pytest.raises(InvalidRequestError, match="more than this instance's KV cache holds"):
        small.add_request("big", [1] * 20)


def test_engine_keeps_serving_after_invalid_requests(eng, drain, make_streams):
    """Invalid add_request calls between steps do not disturb the requests already being served."""
    ref = LLMEngine.from_model("tiny", EngineConfig(dtype="float32", block_size=4, num_blocks=64))
    want = {f"ok{i}": r.output_token_ids
            for i, r in enumerate(ref.generate([[10, 20, 30], [40] * 9], SamplingParams(max_tokens=12)))}
    streams = make_streams()
    eng.add_request("ok0", [10, 20, 30], SamplingParams(max_tokens=12))
    eng.add_request("ok1", [40] * 9, SamplingParams(max_tokens=12))
    bad_calls = [
        lambda: eng.add_request("ok0", [1]),
        lambda: eng.add_request("x", []),
        lambda: eng.add_request("x", [1] * CONTEXT),
        lambda: eng.add_request("x", [999]),
        lambda: eng.add_request("x", [1], SamplingParams(max_tokens=0)),
        lambda: eng.add_request("x", [1], SamplingParams(temperature=-1.0)),
    ]
    for bad in bad_calls:
        streams.feed(eng.step())
        with pytest.raises(InvalidRequestError):
            bad()
        eng.check_integrity()
    drain(eng, streams)
    assert streams.tokens == want
    assert set(eng.requests) == set()


def test_request_near_the_context_limit_stops_at_it(eng, drain):
    """max_tokens beyond the context window: generation stops (LENGTH) when the context is full."""
    eng.add_request("edge", [1] * (CONTEXT - 3), SamplingParams(max_tokens=50, ignore_eos=True))
    streams = drain(eng)
    assert len(streams.tokens["edge"]) == 3
    assert streams.finish["edge"].value == "length"


# ---- weights ---------------------------------------------------------------------------------------


def test_unknown_model_name():
    with pytest.raises(WeightsError, match=r"unknown model 'llama-9000'.*tiny, smollm2"):
        LLMEngine.from_model("llama-9000")


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(WeightsError, match="nowhere/model"):
        LLMEngine.from_model(str(missing))
    with pytest.raises(WeightsError, match="nowhere"):
        LLMEngine.from_model(str(tmp_path / "nowhere.gguf"))


def test_folder_without_config(tmp_path):
    with pytest.raises(WeightsError, match="no config.json"):
        LLMEngine.from_model(str(tmp_path))


def _folder(tmp_path, hf_llama, name: str):
    d = tmp_path / name
    d.mkdir()
    shutil.copy(hf_llama.path / "config.json", d / "config.json")
    return d


def test_folder_without_weights(tmp_path, hf_llama):
    d = _folder(tmp_path, hf_llama, "noweights")
    with pytest.raises(WeightsError, match=r"no \*.safetensors weights"):
        LLMEngine.from_model(str(d))


def test_bad_config_json(tmp_path, hf_llama):
    d = _folder(tmp_path, hf_llama, "badcfg")
    (d / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="cannot read JSON"):
        LLMEngine.from_model(str(d))
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(WeightsError, match="unsupported model_type 'gpt2'"):
        LLMEngine.from_model(str(d))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    with pytest.raises(WeightsError, match="invalid model config"):
        LLMEngine.from_model(str(d))


def test_corrupt_safetensors_garbage(tmp_path, hf_llama):
    """config.json from a real small model and random bytes as model.safetensors."""
    d = _folder(tmp_path, hf_llama, "garbage")
    (d / "model.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(WeightsError, match="model.safetensors: corrupt or unreadable safetensors file"):
        LLMEngine.from_model(str(d), EngineConfig(dtype="float32", num_blocks=8))


def test_corrupt_safetensors_truncated(tmp_path, hf_llama):
    d = _folder(tmp_path, hf_llama, "truncated")
    data = (hf_llama.path / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="corrupt or unreadable safetensors file"):
        LLMEngine.from_model(str(d), EngineConfig(dtype="float32", num_blocks=8))


def test_safetensors_with_missing_or_misshapen_tensors(tmp_path, hf_llama):
    """A readable checkpoint that does not match config.json: the tensor is named."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in hf_llama.model.state_dict().items()}
    d = _folder(tmp_path, hf_llama, "missing")
    save_file({k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"},
              str(d / "model.safetensors"))
    with pytest.raises(WeightsError, match="missing weights for 'layers.1.mlp.gate_up_proj.weight'"):
        LLMEngine.from_model(str(d), EngineConfig(dtype="float32", num_blocks=8))
    bad = dict(state)
    bad["model.norm.weight"] = state["model.norm.weight"][:-1].clone()
    save_file(bad, str(d / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"tensor 'norm.weight' has shape \(63,\), expected \(64,\)"):
        LLMEngine.from_model(str(d), EngineConfig(dtype="float32", num_blocks=8))
    extra = {**state, "model.layers.0.mystery.weight": state["model.norm.weight"].clone()}
    save_file(extra, str(d / "model.safetensors"))
    with pytest.raises(WeightsError, match="unexpected tensor 'layers.0.mystery.weight'"):
        LLMEngine.from_model(str(d), EngineConfig(dtype="float32", num_blocks=8))


def test_gguf_with_unsupported_tensor_type(tmp_path, hf_llama_259, gguf_writer):
    """A tensor stored as Q8_1, which gguf.quants.dequantize does not implement: the error names it."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    with pytest.raises(NotImplementedError):  # the premise: gguf cannot dequantize Q8_1
        dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1][1]), np.uint8),
                   gguf.GGMLQuantizationType.Q8_1)
    path = gguf_writer(tmp_path / "q81.gguf", hf_llama_259, bad_tensor="blk.1.attn_v.weight", bad_type="Q8_1")
    with pytest.raises(WeightsError, match="tensor blk.1.attn_v.weight has unsupported type Q8_1"):
        LLMEngine.from_model(str(path), EngineConfig(dtype="float32", num_blocks=8))


def test_gguf_garbage_and_truncated(tmp_path, hf_llama_259, gguf_writer):
    """Random bytes and cut-off copies of a valid file (header, metadata, tensor data) are refused."""
    good = gguf_writer(tmp_path / "good.gguf", hf_llama_259)
    LLMEngine.from_model(str(good), EngineConfig(dtype="float32", num_blocks=8))  # the uncut file loads
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(os.urandom(5000))
    with pytest.raises(WeightsError, match="not a readable GGUF file"):
        LLMEngine.from_model(str(garbage))
    data = good.read_bytes()
    for cut in (0, 3, 100, 2000, len(data) // 2, len(data) - 10):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(WeightsError):
            LLMEngine.from_model(str(bad), EngineConfig(dtype="float32", num_blocks=8))


def test_gguf_with_missing_metadata(tmp_path, hf_llama_259, gguf_writer):
    """A GGUF without a required llama field (here the head count) is a WeightsError, not a TypeError."""
    path = gguf_writer(tmp_path / "nohead.gguf", hf_llama_259, skip_keys=("add_head_count",))
    with pytest.raises(WeightsError, match="invalid llama metadata"):
        LLMEngine.from_model(str(path), EngineConfig(dtype="float32", num_blocks=8))
    path = gguf_writer(tmp_path / "notok.gguf", hf_llama_259, skip_keys=("add_tokenizer_model",))
    with pytest.raises(WeightsError, match="tokenizer model None is not supported"):
        LLMEngine.from_model(str(path), EngineConfig(dtype="float32", num_blocks=8))
