"""The SDK as its own distribution (sdk/pyproject.toml, `kvferry-sdk`): `pip install ./sdk` into a
fresh venv without torch or the server, offline (the wheels `make install` keeps in
.venv/wheelhouse), then the READMEs' SDK examples, as written there, against a running cluster."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_e2e_failures import start_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]
# `make install` fills it (Makefile: the SDK's dependencies and its build backend); another with
# KVFERRY_SDK_WHEELHOUSE.
WHEELHOUSE = Path(os.environ.get("KVFERRY_SDK_WHEELHOUSE") or Path(sys.prefix) / "wheelhouse")
NEEDED_WHEELS = ("pyzmq", "msgspec", "setuptools")
DEFAULT_ENDPOINT = "tcp://127.0.0.1:17101"  # what the examples connect to: frontend 0's SDK endpoint


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", path.read_text(), re.M | re.S)


def examples() -> list[tuple[str, str]]:
    """(name, code): every python block of README.md and sdk/README.md that talks to the default
    local endpoint (the CurveZMQ one names another host and key files)."""
    found = []
    for rel in ("README.md", "sdk/README.md"):
        blocks = [b for b in python_blocks(ROOT / rel) if DEFAULT_ENDPOINT in b]
        found += [(f"{rel}#{i}", b) for i, b in enumerate(blocks)]
    return found


def clean_env() -> dict[str, str]:
    """This process's environment without what would let the venv see the checkout or this venv, and
    without the machine's pip configuration (its indexes, find-links)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONNOUSERSITE": "1"}


def run(argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sdk_python(tmp_path_factory) -> Path:
    """The python of a fresh venv (no system site-packages) holding only `pip install ./sdk`."""
    missing = [n for n in NEEDED_WHEELS if not list(WHEELHOUSE.glob(f"{n}-*.whl"))]
    if missing:
        pytest.skip(f"no {', '.join(missing)} wheel in {WHEELHOUSE} (`make install` downloads them; "
                    f"or set KVFERRY_SDK_WHEELHOUSE)")
    tmp = tmp_path_factory.mktemp("sdk-dist")
    # The SDK's sources as they lie in the repository (sdk/ and its sibling protocol/), copied so that
    # pip's in-place build leaves the checkout alone, and so that nothing else of the repo is at hand.
    src = tmp / "src"
    skip = shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
    for name in ("sdk", "protocol"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    venv = tmp / "venv"
    out = run([sys.executable, "-m", "venv", str(venv)], tmp, 120)
    assert out.returncode == 0, out.stderr
    py = venv / "bin" / "python"
    out = run([str(py), "-m", "pip", "install", "--no-index", "--find-links", str(WHEELHOUSE), "./sdk"], src, 180)
    assert out.returncode == 0, f"pip install ./sdk failed:\n{out.stdout}\n{out.stderr}"
    return py


def test_sdk_installs_alone_without_torch_or_the_server(sdk_python, tmp_path):
    code = """
import importlib, importlib.metadata as md, json, pkgutil, sys
import sdk, protocol
mods = sorted(m.name for m in pkgutil.iter_modules(protocol.__path__))
for m in mods:
    if m != "frames":
        importlib.import_module("protocol." + m)
try:
    import protocol.frames
    frames = "imported"
except ImportError as e:
    frames = str(e)
dists = sorted(d.metadata["Name"].lower() for d in md.distributions())
print(json.dumps({"sdk": sdk.__file__, "protocol": protocol.__file__, "mods": mods, "frames": frames,
                  "torch": "torch" in sys.modules, "requires": md.requires("kvferry-sdk"), "dists": dists}))
"""
    out = run([str(sdk_python), "-c", code], tmp_path, 60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    site = str(sdk_python.parents[1])
    assert got["sdk"].startswith(site) and got["protocol"].startswith(site)  # the installed copy, not the checkout
    assert got["torch"] is False
    assert "frames" in got["mods"] and "needs torch" in got["frames"]  # the one tensor module, torch on demand
    assert sorted(r.split(">")[0].split("=")[0] for r in got["requires"]) == ["msgspec", "pyzmq"]
    assert "torch" not in got["dists"] and "kvferry" not in got["dists"]
    assert {"kvferry-sdk", "pyzmq", "msgspec"} <= set(got["dists"])
    assert run([str(sdk_python), "-c", "import torch"], tmp_path, 30).returncode != 0


@pytest.fixture(scope="module")
def cluster():
    # a torch worker on the tiny model: its tokenizer has the chat template the examples use
    c = start_cluster(1, {"engine": "torch", "model": "tiny", "dtype": "float32", "num_blocks": 256, "max_num_seqs": 8})
    try:
        yield c
    finally:
        c.stop()


def test_the_readmes_find_their_sdk_examples():
    names = [n for n, _ in examples()]
    assert any(n.startswith("README.md#") for n in names), names
    assert sum(n.startswith("sdk/README.md#") for n in names) >= 2, names


@pytest.mark.parametrize("name,code", examples(), ids=[n for n, _ in examples()])
def test_readme_sdk_example_runs_in_the_sdk_only_venv(sdk_python, cluster, tmp_path, name, code):
    script = tmp_path / "example.py"
    script.write_text(code.replace(DEFAULT_ENDPOINT, cluster.sdk_endpoint))
    out = run([str(sdk_python), str(script)], tmp_path, 120)
    assert out.returncode == 0, f"{name}:\n{out.stdout}\n{out.stderr}"
    assert out.stdout.strip(), name
    if "request_id" in code:  # `print(..., r.usage.total_tokens, r.request_id)`: the finished generation
        assert re.search(r" [1-9]\d* [a-z]+-[0-9a-f]{24}\n", out.stdout), out.stdout
