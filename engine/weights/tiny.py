"""`tiny`: a small random-weight Llama with a byte-level tokenizer, made from a seed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from engine.config import ModelConfig
from engine.tokenizer import Tokenizer

if TYPE_CHECKING:  # imported when tensors are made: the frontend needs only the tokenizer
    import torch

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_config(vocab_size: int = 256 + len(SPECIAL_TOKENS)) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=None, eos_token_ids=(256 + SPECIAL_TOKENS.index("<|im_end|>"),),
    )


def random_tensors(cfg: ModelConfig, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Hugging Face named random tensors. Scaled so greedy outputs vary (not a 2-token cycle)."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def mat(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen) * (1.5 / cols**0.5)

    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    yield "model.embed_tokens.weight", torch.randn(cfg.vocab_size, h, generator=gen)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", torch.ones(h)
        yield p + "post_attention_layernorm.weight", torch.ones(h)
        yield p + "self_attn.q_proj.weight", mat(q, h)
        yield p + "self_attn.k_proj.weight", mat(kv, h)
        yield p + "self_attn.v_proj.weight", mat(kv, h)
        yield p + "self_attn.o_proj.weight", mat(h, q)
        yield p + "mlp.gate_proj.weight", mat(cfg.intermediate_size, h)
        yield p + "mlp.up_proj.weight", mat(cfg.intermediate_size, h)
        yield p + "mlp.down_proj.weight", mat(h, cfg.intermediate_size)
    yield "model.norm.weight", torch.ones(h)
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", mat(cfg.vocab_size, h)


def byte_tokenizer() -> Tokenizer:
    """One token per byte (GPT-2's byte-to-unicode alphabet) plus ChatML special tokens."""
    vocab = {char: byte for byte, char in enumerate(bytes_to_unicode())}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    eos = 256 + SPECIAL_TOKENS.index("<|im_end|>")
    return Tokenizer(backend, (eos,), chat_template=CHATML)


def bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-in character for each byte value 0..255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    chars, shift = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + shift))
            shift += 1
    return chars
