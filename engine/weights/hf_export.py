"""Write a model that our loader reads (tiny, smollm2, a .gguf) as a Hugging Face folder.

vLLM cannot load GGUF in the version measured, so `kvferry bench engine` hands it this folder:
config.json + model.safetensors (float32, the tensors our own loader produces, q/k already in
Hugging Face order) + tokenizer.json (+ tokenizer_config.json with the chat template). The folder
is cached under ~/.cache/kvferry/<name>-hf/ and reused while its source is unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

MARKER = "kvferry-export.json"
EXPORT_VERSION = 1


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvferry"


def _hf_config(cfg, dtype_name: str = "float32") -> dict:
    eos = list(cfg.eos_token_ids)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias,
        "hidden_act": "silu",
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "torch_dtype": dtype_name,
    }


def _source_key(spec: str) -> dict:
    path = Path(spec)
    if spec == "smollm2":
        from engine.weights.loader import smollm2_path

        path = smollm2_path()
    if path.is_file():
        st = path.stat()
        return {"spec": spec, "file": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "version": EXPORT_VERSION}
    return {"spec": spec, "version": EXPORT_VERSION}


def hf_folder_for(spec: str, seed: int = 0) -> Path:
    """A Hugging Face folder holding model `spec`: the folder itself, or a cached export."""
    if Path(spec).is_dir():
        return Path(spec)
    from engine.weights.loader import resolve

    key = _source_key(spec) | {"seed": seed}
    source = resolve(spec, seed=seed)
    dest = cache_dir() / f"{source.name}-hf"
    marker = dest / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == key:
                return dest
        except ValueError:
            pass
    export(source, dest, key)
    return dest


def export(source, dest: Path, key: dict) -> None:
    import torch
    from safetensors.torch import save_file

    cfg = source.config
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        tensors: dict[str, torch.Tensor] = {}
        for name, t in source.tensors():
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # tied: safetensors refuses shared storage, and HF re-ties on load
            tensors[name] = t.to(torch.float32).contiguous()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(_hf_config(cfg), indent=2) + "\n")
        tok = source.tokenizer
        if tok is not None:
            tok.backend.save(str(tmp / "tokenizer.json"))
            tc = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
            if tok.bos_token_id is not None:
                tc["bos_token"] = tok.id_to_token(tok.bos_token_id)
            if tok.eos_token_ids:
                tc["eos_token"] = tok.id_to_token(tok.eos_token_ids[0])
            if tok.chat_template:
                tc["chat_template"] = tok.chat_template
            (tmp / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")
        (tmp / MARKER).write_text(json.dumps(key) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.chmod(0o755)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
