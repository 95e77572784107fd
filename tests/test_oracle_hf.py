"""The independent oracle: transformers' own Llama, on the same random weights, decodes greedily one prompt
at a time; our engine, batching the prompts together through its paged KV cache, must give the same ids —
with plenty of blocks, under preemption by recompute, with chunked prefill, with tied embeddings, with
Llama-3 rope scaling, and loaded from a GGUF file instead of the Hugging Face folder.
"""

from __future__ import annotations

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams

pytest.importorskip("transformers")

PROMPT_LENGTHS = (3, 17, 40, 90)
NEW_TOKENS = 24
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)


def prompts_for(vocab: int, lengths=PROMPT_LENGTHS, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def base_reference(hf_llama):
    """transformers' greedy ids for the default random Llama (computed once)."""
    prompts = prompts_for(hf_llama.config["vocab_size"])
    return prompts, [hf_llama.greedy(p, NEW_TOKENS) for p in prompts]


def engine_ids(path, prompts, **cfg) -> tuple[list[list[int]], LLMEngine]:
    eng = LLMEngine.from_model(str(path), EngineConfig(dtype="float32", debug_checks=True, **cfg))
    reqs = eng.generate(prompts, GREEDY)
    assert all(len(r.output_token_ids) == NEW_TOKENS for r in reqs)
    eng.check_integrity()
    assert eng.blocks.num_used == 0
    return [r.output_token_ids for r in reqs], eng


def test_reference_outputs_are_not_degenerate(base_reference):
    """The scaled random weights give varied greedy continuations (a meaningful comparison)."""
    _, ref = base_reference
    assert all(len(set(ids)) >= 6 for ids in ref)
    assert len({tuple(ids) for ids in ref}) == len(ref)


def test_batched_greedy_matches_transformers(hf_llama, base_reference):
    """Plenty of blocks: the 4 prompts run together (prefill + batched paged decode)."""
    prompts, ref = base_reference
    got, _ = engine_ids(hf_llama.path, prompts, block_size=16, num_blocks=256)
    assert got == ref


def test_small_blocks_and_small_batches_match_transformers(hf_llama, base_reference):
    """Block size 1 and at most 2 sequences at a time (requests queue): same ids."""
    prompts, ref = base_reference
    got, _ = engine_ids(hf_llama.path, prompts, block_size=1, num_blocks=1024, max_num_seqs=2)
    assert got == ref


def test_greedy_matches_transformers_under_preemption(hf_llama, base_reference):
    """A pool of 32 blocks of 4 (128 tokens) holds the longest request (90 + 24) alone but not the batch:
    requests are preempted, recomputed from prompt + output, and still give transformers' ids."""
    prompts, ref = base_reference
    got, eng = engine_ids(hf_llama.path, prompts, block_size=4, num_blocks=32, watermark=0.0)
    assert eng.scheduler.num_preemptions > 0
    assert got == ref


def test_greedy_matches_transformers_with_chunked_prefill_block_size_1(hf_llama, base_reference):
    """A 32-token budget (< the 90-token prompt) splits prefills into chunks that attend to the cached
    keys of earlier chunks. Block size 1 keeps every chunk end on a block boundary."""
    prompts, ref = base_reference
    got, _ = engine_ids(hf_llama.path, prompts, block_size=1, num_blocks=1024, max_num_batched_tokens=32)
    assert got == ref


def test_greedy_matches_transformers_with_chunked_prefill(hf_llama, base_reference):
    """Chunked prefill with block size 8: chunks end mid-block."""
    prompts, ref = base_reference
    got, _ = engine_ids(hf_llama.path, prompts, block_size=8, num_blocks=256, max_num_batched_tokens=32)
    assert got == ref


def test_tied_embeddings_match_transformers(hf_llama_factory):
    """tie_word_embeddings=True: no lm_head in the checkpoint, logits from the embedding matrix."""
    hf = hf_llama_factory("tied", seed=2, tie_word_embeddings=True)
    prompts = prompts_for(hf.config["vocab_size"], (5, 33), seed=3)
    ref = [hf.greedy(p, NEW_TOKENS) for p in prompts]
    got, eng = engine_ids(hf.path, prompts, block_size=8, num_blocks=64)
    assert eng.model_config.tie_word_embeddings
    assert got == ref


def test_llama3_rope_scaling_matches_transformers(hf_llama_factory):
    """rope_scaling of type llama3 (and a non-default rope_theta), as transformers >= 5 writes it
    (`rope_parameters` in config.json)."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    hf = hf_llama_factory("llama3rope", seed=4, rope_theta=500000.0, rope_scaling=scaling)
    prompts = prompts_for(hf.config["vocab_size"], (7, 80), seed=5)
    ref = [hf.greedy(p, NEW_TOKENS) for p in prompts]
    got, eng = engine_ids(hf.path, prompts, block_size=16, num_blocks=64)
    assert eng.model_config.rope_theta == 500000.0
    assert eng.model_config.rope_scaling["rope_type"] == "llama3"
    assert got == ref


def test_gguf_export_of_the_same_weights_matches_transformers(hf_llama_259, gguf_writer, tmp_path):
    """The GGUF path: weights written the way llama.cpp's converter does (q/k rows permuted for its rotary
    layout) load back to the same model (greedy ids equal transformers'), with the byte-level tokenizer."""
    path = gguf_writer(tmp_path / "model.gguf", hf_llama_259)
    prompts = prompts_for(259, (4, 30), seed=6)
    ref = [hf_llama_259.greedy(p, NEW_TOKENS) for p in prompts]
    got, eng = engine_ids(path, prompts, block_size=8, num_blocks=64)
    assert got == ref
    assert eng.tokenizer.encode("hé <|im_end|>") == [104, 195, 169, 32, 258]
    assert eng.tokenizer.decode(eng.tokenizer.encode("naïve café")) == "naïve café"
