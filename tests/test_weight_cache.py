"""The converted-weights cache (engine/weights/cache.py): written on a first load, read back on the
next instead of converting, bit-identical tensors and greedy tokens, recovery from damaged entries,
atomic writes under concurrency, the off switch, an unwritable directory; and the start-up steps
around it (install-time kernel build and cache warm-up, the worker's progress lines).

Every test points KVFERRY_CACHE_DIR at its own tmp dir; the GGUFs are the small conftest ones.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.weights import cache as weight_cache
from engine.weights import loader
from engine.weights.gguf_file import GGUFModel
from engine.weights.loader import build_model, resolve

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[72, 101, 108, 108, 111], [1, 2, 3, 4, 5, 6, 7, 8, 9], [200, 17, 42]]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "kvferry-cache"
    monkeypatch.setenv("KVFERRY_CACHE_DIR", str(d))
    monkeypatch.delenv("KVFERRY_WEIGHT_CACHE", raising=False)
    monkeypatch.setattr(weight_cache, "MIN_SOURCE_BYTES", 0)  # the test models are far below 1 MiB
    return d


@pytest.fixture
def gguf_path(tmp_path, hf_llama_259, gguf_writer) -> Path:
    return gguf_writer(tmp_path / "model.gguf", hf_llama_259)


def entries(d: Path, suffix: str = ".safetensors") -> list[Path]:
    return sorted((d / "weights").glob(f"*{suffix}")) if (d / "weights").is_dir() else []


def state(model) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def greedy(spec: str, dtype: str) -> list[list[int]]:
    eng = LLMEngine.from_model(spec, EngineConfig(dtype=dtype, num_blocks=64, block_size=8))
    reqs = eng.generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))
    return [r.output_token_ids for r in reqs]


def forbid_gguf_parsing(monkeypatch) -> None:  # noqa: ANN001
    """A load that reads the file (header or tensors) now fails the test."""
    def boom(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the GGUF was read although the cache holds it")
    monkeypatch.setattr(loader, "GGUFModel", boom)
    monkeypatch.setattr(GGUFModel, "tensors", boom)


# ---- first load writes, second reads ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_first_load_converts_and_writes_second_reads_without_converting(gguf_path, cache_dir, monkeypatch, dtype):
    cold = build_model(resolve(str(gguf_path)), dtype, CPU)
    assert cold.weights_load.source == "convert" and not cold.weights_load.note
    (entry,) = entries(cache_dir)
    assert cold.weights_load.cache_path == entry and dtype_tag(dtype) in entry.name
    assert len(entries(cache_dir, ".json")) == 1  # config + tokenizer

    forbid_gguf_parsing(monkeypatch)
    warm = build_model(resolve(str(gguf_path)), dtype, CPU)
    assert warm.weights_load.source == "cache" and warm.weights_load.cache_path == entry
    assert_same_state(state(cold), state(warm))


def dtype_tag(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def test_cached_tensors_equal_uncached_ones(gguf_path, monkeypatch):
    """What the cache holds is exactly what load_weights gets without it."""
    monkeypatch.setenv("KVFERRY_WEIGHT_CACHE", "0")
    direct = build_model(resolve(str(gguf_path)), torch.bfloat16, CPU)
    assert direct.weights_load.source == "direct"
    monkeypatch.delenv("KVFERRY_WEIGHT_CACHE")
    build_model(resolve(str(gguf_path)), torch.bfloat16, CPU)
    cached = build_model(resolve(str(gguf_path)), torch.bfloat16, CPU)
    assert cached.weights_load.source == "cache"
    assert_same_state(state(direct), state(cached))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_greedy_tokens_identical_with_and_without_cache(gguf_path, monkeypatch, dtype):
    monkeypatch.setenv("KVFERRY_WEIGHT_CACHE", "0")
    ref = greedy(str(gguf_path), dtype)
    monkeypatch.delenv("KVFERRY_WEIGHT_CACHE")
    assert greedy(str(gguf_path), dtype) == ref  # converting (and writing the cache)
    forbid_gguf_parsing(monkeypatch)
    assert greedy(str(gguf_path), dtype) == ref  # from the cache
    assert len(set(map(tuple, ref))) > 1, "degenerate reference"


def test_cached_tokenizer_and_config_equal_the_files(gguf_path, monkeypatch):
    from_file = resolve(str(gguf_path))
    forbid_gguf_parsing(monkeypatch)
    cached = resolve(str(gguf_path))
    assert cached.config == from_file.config
    a, b = from_file.tokenizer, cached.tokenizer
    for text in ("hé <|im_end|> naïve café", "1234 + 5678 = ?", "<|im_start|>user\nhi<|im_end|>"):
        assert a.encode(text) == b.encode(text)
        assert a.decode(a.encode(text)) == b.decode(b.encode(text))
    assert (a.eos_token_ids, a.bos_token_id, a.add_bos, a.chat_template, a.vocab_size) == (
        b.eos_token_ids, b.bos_token_id, b.add_bos, b.chat_template, b.vocab_size)


def test_hf_folder_cached_only_when_loading_converts(hf_llama_259, cache_dir, monkeypatch):
    """A float32 folder loaded in float32 reads its safetensors directly; in bfloat16 the cast is cached."""
    spec = str(hf_llama_259.path)
    assert build_model(resolve(spec), torch.float32, CPU).weights_load.source == "direct"
    assert entries(cache_dir) == []
    monkeypatch.setenv("KVFERRY_WEIGHT_CACHE", "0")
    direct = build_model(resolve(spec), torch.bfloat16, CPU)
    monkeypatch.delenv("KVFERRY_WEIGHT_CACHE")
    assert build_model(resolve(spec), torch.bfloat16, CPU).weights_load.source == "convert"
    cached = build_model(resolve(spec), torch.bfloat16, CPU)
    assert cached.weights_load.source == "cache"
    assert_same_state(state(direct), state(cached))


def test_tiny_model_needs_no_cache(cache_dir):
    eng = LLMEngine.from_model("tiny", EngineConfig(num_blocks=16))
    assert eng.executor.model.weights_load.source == "direct"
    assert not cache_dir.exists()


def test_small_sources_bypass_the_cache(gguf_path, cache_dir, monkeypatch):
    monkeypatch.setattr(weight_cache, "MIN_SOURCE_BYTES", gguf_path.stat().st_size + 1)
    assert build_model(resolve(str(gguf_path)), torch.bfloat16, CPU).weights_load.source == "direct"
    assert not cache_dir.exists()


def test_cache_off_by_env(gguf_path, cache_dir, monkeypatch):
    monkeypatch.setenv("KVFERRY_WEIGHT_CACHE", "0")
    for _ in range(2):
        load = build_model(resolve(str(gguf_path)), torch.bfloat16, CPU).weights_load
        assert load.source == "direct" and "KVFERRY_WEIGHT_CACHE" in load.note
    assert not cache_dir.exists()


def test_changed_source_is_converted_again_and_replaces_its_entry(tmp_path, hf_llama_259, hf_llama_factory,
                                                                  gguf_writer, cache_dir, monkeypatch):
    path = gguf_writer(tmp_path / "m.gguf", hf_llama_259)
    first = build_model(resolve(str(path)), torch.bfloat16, CPU).weights_load
    other = hf_llama_factory("vocab259-other", seed=2, vocab_size=259)
    gguf_writer(path, other)  # another model under the same path
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a distinct mtime even on coarse clocks
    second = build_model(resolve(str(path)), torch.bfloat16, CPU)
    assert second.weights_load.source == "convert"
    assert entries(cache_dir) == [second.weights_load.cache_path] != [first.cache_path]
    assert len(entries(cache_dir, ".json")) == 1  # the old description went too
    monkeypatch.setenv("KVFERRY_WEIGHT_CACHE", "0")
    assert_same_state(state(second), state(build_model(resolve(str(path)), torch.bfloat16, CPU)))


# ---- damaged entries ---------------------------------------------------------------------------------


def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _garbage_header(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[8:40] = b"\xff" * 32
    p.write_bytes(bytes(data))


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _foreign(p: Path) -> None:
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3, dtype=torch.bfloat16)}, str(p))  # valid safetensors, not ours


@pytest.mark.parametrize("damage", [_truncate, _garbage_header, _empty, _foreign])
def test_damaged_entry_is_detected_reconverted_and_replaced(gguf_path, cache_dir, caplog, damage):
    good = state(build_model(resolve(str(gguf_path)), torch.bfloat16, CPU))
    (entry,) = entries(cache_dir)
    damage(entry)
    with caplog.at_level(logging.WARNING, logger="engine.weights.cache"):
        again = build_model(resolve(str(gguf_path)), torch.bfloat16, CPU)
    assert again.weights_load.source == "convert"
    assert any("unusable" in r.getMessage() for r in caplog.records)
    assert_same_state(good, state(again))
    third = build_model(resolve(str(gguf_path)), torch.bfloat16, CPU)
    assert third.weights_load.source == "cache"  # the replacement is whole
    assert_same_state(good, state(third))


@pytest.mark.parametrize("content", ["", "{not json", json.dumps({"key": {}, "meta": {}}),
                                     json.dumps({"key": None, "meta": {"config": {}}})])
def test_damaged_description_falls_back_to_the_file(gguf_path, cache_dir, content):
    resolve(str(gguf_path))
    (entry,) = entries(cache_dir, ".json")
    entry.write_text(content)
    source = resolve(str(gguf_path))
    assert source.config == GGUFModel(gguf_path).config
    assert source.tokenizer.encode("abc") == [97, 98, 99]


def test_description_with_the_right_key_but_bad_content_falls_back(gguf_path, cache_dir, caplog):
    resolve(str(gguf_path))
    (entry,) = entries(cache_dir, ".json")
    doc = json.loads(entry.read_text())
    doc["meta"] = {"config": {"nonsense": 1}, "tokenizer": None}
    entry.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING):
        source = resolve(str(gguf_path))
    assert source.config == GGUFModel(gguf_path).config
    assert any("unusable description" in r.getMessage() for r in caplog.records)


# ---- writing: atomic, concurrent, unwritable -------------------------------------------------------


def test_writer_dying_mid_write_leaves_no_entry(gguf_path, cache_dir, monkeypatch):
    """An exception inside the write (a crash, Ctrl-C) leaves neither a partial entry nor a temp file."""
    import safetensors.torch

    def half_then_die(tensors, filename, metadata=None):  # noqa: ANN001, ANN202
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_model(resolve(str(gguf_path)), torch.bfloat16, CPU)
    assert list((cache_dir / "weights").glob("*.safetensors*")) == []


def test_temp_file_of_a_killed_writer_is_ignored_then_pruned(gguf_path, cache_dir):
    """kill -9 mid-write leaves a temp file under another name: loads ignore it, the next write of that
    entry removes it once it is stale."""
    key = weight_cache.source_key((gguf_path,), "bfloat16")
    entry = weight_cache.entry_path("model", key, ".safetensors")
    entry.parent.mkdir(parents=True)
    stale = entry.with_name(entry.name + ".999-deadbeef.tmp")
    stale.write_bytes(b"half an entry")
    old = time.time() - weight_cache.STALE_TMP_S - 60
    os.utime(stale, (old, old))
    assert build_model(resolve(str(gguf_path)), torch.bfloat16, CPU).weights_load.source == "convert"
    assert not stale.exists()
    assert build_model(resolve(str(gguf_path)), torch.bfloat16, CPU).weights_load.source == "cache"


def test_two_threads_converting_at_once_leave_a_valid_entry(gguf_path, cache_dir):
    """Both miss, both convert, both write (a barrier makes them overlap): the survivor is whole."""
    source = resolve(str(gguf_path))
    barrier = threading.Barrier(2, timeout=60)

    def tensors():  # noqa: ANN202
        barrier.wait()  # both have missed the cache before either writes
        yield from GGUFModel(gguf_path).tensors()

    results: list = []
    errors: list = []

    def run() -> None:
        try:
            got, origin = weight_cache.load(source.name, source.files, tensors, torch.bfloat16)
            results.append((dict(got), origin))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 2
    assert {o.source for _, o in results} == {"convert"}
    (entry,) = entries(cache_dir)
    assert list(entry.parent.glob("*.tmp")) == []
    key = weight_cache.source_key(source.files, "bfloat16")
    back = weight_cache.read_tensors(entry, key, torch.bfloat16)
    assert back.keys() == results[0][0].keys()
    assert all(torch.equal(back[k], results[0][0][k]) for k in back)


_WRITER = """
import sys, time
from pathlib import Path
import torch
from engine.weights import cache
from engine.weights.loader import resolve
cache.MIN_SOURCE_BYTES = 0
gguf, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
real_write = cache.write_tensors
def write_when_told(*args):
    ready.touch()
    deadline = time.monotonic() + 120
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    real_write(*args)
cache.write_tensors = write_when_told
source = resolve(gguf)
_, origin = cache.load(source.name, source.files, source.tensors, torch.bfloat16)
print(origin.source, origin.note)
"""


def test_two_processes_writing_at_once_leave_a_valid_entry(gguf_path, cache_dir, tmp_path):
    go = tmp_path / "go"
    env = {**os.environ, "KVFERRY_CACHE_DIR": str(cache_dir)}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(gguf_path), str(tmp_path / f"ready{i}"), str(go)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        deadline = time.monotonic() + 300  # generous: two torch imports on a busy 2-core machine
        while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                [p.communicate() for p in procs if p.poll() is not None]
            time.sleep(0.05)
        go.touch()  # both have converted; now both write and rename at once
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all(out.split() == ["convert"] for out, _ in outs), outs
    (entry,) = entries(cache_dir)
    assert list(entry.parent.glob("*.tmp")) == []
    assert build_model(resolve(str(gguf_path)), torch.bfloat16, CPU).weights_load.source == "cache"


def test_unwritable_cache_dir_still_loads(gguf_path, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("KVFERRY_CACHE_DIR", str(blocker / "cache"))  # mkdir fails, even as root
    monkeypatch.setenv("KVFERRY_WEIGHT_CACHE", "0")
    ref = state(build_model(resolve(str(gguf_path)), torch.bfloat16, CPU))
    monkeypatch.delenv("KVFERRY_WEIGHT_CACHE")
    with caplog.at_level(logging.WARNING, logger="engine.weights.cache"):
        model = build_model(resolve(str(gguf_path)), torch.bfloat16, CPU)
    assert model.weights_load.source == "convert" and model.weights_load.note.startswith("not written")
    assert any("not written" in r.getMessage() for r in caplog.records)
    assert_same_state(ref, state(model))


# ---- building the model ------------------------------------------------------------------------------


def test_build_leaves_torch_defaults_alone(gguf_path):
    """Parameters are made in place without random init; afterwards torch behaves as before."""
    model = build_model(resolve(str(gguf_path)), torch.bfloat16, CPU)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32
    lin = torch.nn.Linear(8, 8)
    assert lin.weight.dtype == torch.float32 and lin.weight.abs().sum() > 0  # random init works again
    assert torch.empty(2).device.type == "cpu"


# ---- start-up steps: kernel build, cache warm-up, progress lines -------------------------------------


def test_kernel_main_exits_0_when_disabled(monkeypatch, capsys):
    from engine.model import paged_decode_cpu

    monkeypatch.setenv("KVFERRY_PAGED_KERNEL", "0")
    assert paged_decode_cpu.main() == 0
    assert "SDPA" in capsys.readouterr().out


def test_kernel_main_exits_0_without_a_compiler(monkeypatch, capsys):
    from engine.model import paged_decode_cpu

    monkeypatch.setattr(paged_decode_cpu, "_load", lambda: None)  # what a failed build leaves
    assert paged_decode_cpu.main() == 0
    assert "SDPA" in capsys.readouterr().out


def test_warm_fills_the_cache_and_reports(gguf_path, cache_dir, capsys, monkeypatch):
    from engine.weights import warm

    assert warm.main([str(gguf_path), "bfloat16"]) == 0
    assert "converted" in capsys.readouterr().out
    (entry,) = entries(cache_dir)
    assert warm.main([str(gguf_path), "bfloat16"]) == 0
    assert "already cached" in capsys.readouterr().out
    forbid_gguf_parsing(monkeypatch)
    assert build_model(resolve(str(gguf_path)), torch.bfloat16, CPU).weights_load.cache_path == entry
    assert warm.main(["no-such-model"]) == 0  # never fails an install
    assert "not warmed" in capsys.readouterr().out


def test_worker_logs_its_start_steps(gguf_path, monkeypatch):
    import structlog

    from services.config import WorkerConfig
    from services.worker.engine_factory import build_engine

    monkeypatch.setenv("KVFERRY_PAGED_KERNEL", "0")  # its step is still logged (ready=False, fallback sdpa)
    wc = WorkerConfig(engine="torch", model=str(gguf_path), num_blocks=16)
    with structlog.testing.capture_logs() as logs:
        build_engine(wc)
        build_engine(wc)
    steps = [(e["step"], e.get("source")) for e in logs if e["event"] == "worker.load"]
    assert steps == [("kernel", None), ("weights", "convert"), ("grammar", None), ("engine", None),
                     ("kernel", None), ("weights", "cache"), ("grammar", None), ("engine", None)]
    assert all(e["seconds"] >= 0 for e in logs if e["event"] == "worker.load")
