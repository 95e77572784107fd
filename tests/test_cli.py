"""The `kvferry` command line: help, generate (text, chat, JSON, errors) and bench engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KVFERRY = Path(sys.executable).with_name("kvferry")


def kvferry(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    if not KVFERRY.exists():
        pytest.skip(f"{KVFERRY} is not installed (pip install -e .)")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([str(KVFERRY), *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_help_lists_commands():
    r = kvferry("--help")
    assert r.returncode == 0
    assert "generate" in r.stdout and "bench" in r.stdout
    r = kvferry("bench", "--help")
    assert r.returncode == 0 and "engine" in r.stdout


def test_generate_json_prompt_ids():
    r = kvferry("generate", "--model", "tiny", "--prompt-ids", "1,2,3", "--max-tokens", "5", "--json")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert set(out) == {"token_ids", "text", "finish_reason"}
    assert len(out["token_ids"]) == 5 and all(isinstance(t, int) for t in out["token_ids"])
    assert out["finish_reason"] == "length"
    assert isinstance(out["text"], str)


def test_generate_chat_streams_text():
    r = kvferry("generate", "--model", "tiny", "--chat", "hello", "--max-tokens", "8", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n")
    # greedy: the same text as the JSON form's (stream and whole decode agree)
    j = kvferry("generate", "--model", "tiny", "--chat", "hello", "--max-tokens", "8", "--ignore-eos", "--json")
    assert j.returncode == 0, j.stderr
    assert r.stdout[:-1] == json.loads(j.stdout)["text"]


@pytest.mark.parametrize("args", [
    ("--model", "no-such-model", "--prompt", "hi"),
    ("--model", "tiny", "--prompt-ids", "1,99999"),
])
def test_generate_errors_exit_2(args):
    r = kvferry("generate", *args, "--json")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


def test_bench_engine_json(tmp_path):
    out = tmp_path / "bench.json"
    r = kvferry("bench", "engine", "--model", "tiny", "--batch-sizes", "1,2", "--decode-tokens", "4",
                "--prompt-len", "16", "--prefill-prompts", "2", "--prefill-len", "32", "--no-vllm",
                "--json", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    for key in ("cpu_count", "torch_version", "torch_threads"):
        assert key in res["machine"]
    assert res["model"] == "tiny" and res["dtype"] == "bfloat16"
    assert [rec["batch_size"] for rec in res["records"]] == [1, 2]
    for rec in res["records"]:
        assert rec["decode_tok_s"] > 0 and rec["step_ms"] > 0
        assert rec["vllm_decode_tok_s"] is None and rec["ratio"] is None
    assert res["prefill_tok_s"] > 0
    assert "decode_tok/s" in r.stdout


def test_incremental_detokenizer_holds_back_partial_characters():
    from cli.generate import IncrementalDetokenizer
    from engine.weights.tiny import byte_tokenizer

    tok = byte_tokenizer()
    text = "añ€😀b"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode())  # one token per byte
    d = IncrementalDetokenizer(tok)
    pieces = [d.push([i]) for i in ids] + [d.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_fit_latency_recovers_parameters():
    from bench.engine import Step, fit_latency

    true = {"base_ms": 12.0, "per_seq_ms": 0.8, "per_prefill_token_ms": 0.3, "per_context_token_ms": 0.002}
    steps = []
    for b, p, c in [(1, 0, 128), (4, 0, 512), (16, 0, 2048), (64, 0, 8192), (8, 0, 12288), (8, 0, 600),
                    (1, 256, 256), (8, 2048, 2048), (2, 2048, 2048), (1, 32, 32)]:
        ms = true["base_ms"] + true["per_seq_ms"] * b + true["per_prefill_token_ms"] * p + true["per_context_token_ms"] * c
        steps.append(Step("x", b, p, c, ms))
    fit = fit_latency(steps)
    for k, v in true.items():
        assert fit["params"][k] == pytest.approx(v, rel=1e-6)
    assert fit["max_rel_error"] < 1e-9


def test_only_cli_imports_cli():
    """cli/ is the command line only: no package imports it (tests may, for CLI behaviour)."""
    import ast

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in sorted(root.glob("*/**/*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("cli", "tests") or rel.parts[0].startswith("."):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            offenders += [f"{rel}:{node.lineno}: {n}" for n in names if n == "cli" or n.startswith("cli.")]
    assert not offenders, "\n".join(offenders)
