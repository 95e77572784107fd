"""Llama models from a GGUF file (llama.cpp's format): config, dequantized tensors, tokenizer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from engine.config import ModelConfig
from engine.errors import ConfigError, WeightsError
from engine.tokenizer import Tokenizer

# GGUF tensor name -> Hugging Face name ({i} is the layer).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _reader(path: Path):  # noqa: ANN202 - gguf has no type stubs
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/struct.error/... on corrupt files
        raise WeightsError(f"{path}: not a readable GGUF file ({exc})") from exc


def _field(reader, key: str, default=None):  # noqa: ANN001, ANN202
    f = reader.fields.get(key)
    return default if f is None else f.contents()


class GGUFModel:
    """An opened GGUF file of a Llama-architecture model."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightsError(f"GGUF file not found: {self.path}")
        self.reader = _reader(self.path)
        arch = _field(self.reader, "general.architecture")
        if arch != "llama":
            raise WeightsError(f"{self.path}: architecture {arch!r} is not supported (llama only)")
        try:
            self.config = self._config()
        except (TypeError, ValueError, KeyError, ConfigError) as exc:  # a missing or malformed metadata field
            raise WeightsError(f"{self.path}: invalid llama metadata ({exc})") from exc

    def _config(self) -> ModelConfig:
        r = self.reader
        heads = int(_field(r, "llama.attention.head_count"))
        hidden = int(_field(r, "llama.embedding_length"))
        names = {t.name for t in r.tensors}
        eos = _field(r, "tokenizer.ggml.eos_token_id")
        vocab = _field(r, "llama.vocab_size") or len(r.fields["tokenizer.ggml.tokens"].data)
        return ModelConfig(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(_field(r, "llama.feed_forward_length")),
            num_hidden_layers=int(_field(r, "llama.block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(_field(r, "llama.attention.head_count_kv", heads)),
            head_dim=int(_field(r, "llama.rope.dimension_count", hidden // heads)),
            max_position_embeddings=int(_field(r, "llama.context_length", 4096)),
            rms_norm_eps=float(_field(r, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(_field(r, "llama.rope.freq_base", 10000.0)),
            tie_word_embeddings="output.weight" not in names,
            bos_token_id=_field(r, "tokenizer.ggml.bos_token_id"),
            eos_token_ids=(int(eos),) if eos is not None else (),
        )

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Hugging Face named float32 tensors, q/k rows restored from llama.cpp's rotary order."""
        from gguf.quants import dequantize

        cfg = self.config
        for t in self.reader.tensors:
            name = self._hf_name(t.name)
            try:
                arr = dequantize(t.data, t.tensor_type)
            except NotImplementedError as exc:
                raise WeightsError(f"{self.path}: tensor {t.name} has unsupported type {t.tensor_type.name}") from exc
            arr = np.asarray(arr, dtype=np.float32)
            if ".attn_q." in t.name:
                arr = _unpermute(arr, cfg.num_attention_heads)
            elif ".attn_k." in t.name:
                arr = _unpermute(arr, cfg.num_key_value_heads)
            yield name, torch.from_numpy(np.array(arr, copy=True, order="C"))

    def _hf_name(self, gguf_name: str) -> str:
        parts = gguf_name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
            return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
        if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
            return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
        raise WeightsError(f"{self.path}: unknown tensor {gguf_name!r}")

    def tokenizer(self) -> Tokenizer:
        r = self.reader
        kind = _field(r, "tokenizer.ggml.model")
        if kind != "gpt2":
            raise WeightsError(f"{self.path}: tokenizer model {kind!r} is not supported (gpt2 byte-level BPE only)")
        tokens = _field(r, "tokenizer.ggml.tokens")
        if not tokens:
            raise WeightsError(f"{self.path}: no tokenizer.ggml.tokens")
        # An empty (or absent) merge list is valid (a byte-level vocabulary); gguf reads it as None.
        merges = [tuple(m.split(" ", 1)) for m in (_field(r, "tokenizer.ggml.merges") or [])]
        types = _field(r, "tokenizer.ggml.token_type") or [1] * len(tokens)
        backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                         ignore_merges=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if _field(r, "tokenizer.ggml.pre") == "smollm":
            # SmolLM's tokenizer splits numbers into single digits before the byte-level split.
            backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            backend.pre_tokenizer = byte_level
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([t for t, kind_ in zip(tokens, types) if kind_ == 3])  # 3: control tokens
        return Tokenizer(backend, self.config.eos_token_ids, bos_token_id=self.config.bos_token_id,
                         add_bos=bool(_field(r, "tokenizer.ggml.add_bos_token", False)),
                         chat_template=_field(r, "tokenizer.chat_template"))


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleave of the two rotary halves."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
