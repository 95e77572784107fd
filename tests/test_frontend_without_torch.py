"""The frontend runs without torch: it tokenizes, checks grammars and serves, but holds no weights,
so its start (and every restart by the supervisor) does not pay torch's import (engine.weights.
tokenizer_source)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import sys
from engine.grammar import check_grammar
from protocol.payloads import Grammar
from engine.weights.tokenizer_source import resolve_tokenizer
import services.frontend.http_api, services.frontend.router, services.frontend.structured, services.frontend.tools
for model in sys.argv[1:]:
    tok, name, ctx = resolve_tokenizer(model)
    assert tok.encode("hello") and ctx, (model, name, ctx)
check_grammar(Grammar(kind="json_schema", spec='{"type": "object"}'))
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not loaded, loaded[:5]
print("ok")
"""


@pytest.mark.e2e  # a subprocess: torch must not be imported by anything in it
def test_the_frontend_loads_tokenizers_and_checks_grammars_without_importing_torch():
    from engine.errors import WeightsError
    from engine.weights.tokenizer_source import smollm2_path

    models = ["tiny"]
    try:
        smollm2_path()
        models.append("smollm2")  # its description is in the weights cache once any process read it
        from engine.weights.tokenizer_source import resolve_tokenizer

        resolve_tokenizer("smollm2")  # (this process writes it if nobody did)
    except WeightsError:
        pass
    out = subprocess.run([sys.executable, "-c", PROBE, *models], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr[-3000:]
