"""Shared fixtures of the engine tests: stream collection, random Hugging Face Llama folders, GGUF writing.

Expensive things (transformers models, their saved folders) are built once per session.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

# The test machine has 2 cores, often shared with other work. With a busy core, torch's default two
# intra-op threads make every op wait for the slower one (10-20x slower runs); one thread avoids that.
# KVFERRY_TEST_THREADS overrides. The processes the tests start (`kvferry generate`, bench and
# transfer children) inherit OMP_NUM_THREADS, which torch reads at import: the same single thread
# (a 1500-token `kvferry generate` under load: 97 s with two threads, 15 s with one).
TEST_THREADS = os.environ.get("KVFERRY_TEST_THREADS", "1")
torch.set_num_threads(int(TEST_THREADS))
os.environ.setdefault("OMP_NUM_THREADS", TEST_THREADS)

# Under pytest-xdist (`make test` runs two workers), each worker and every process it starts picks
# ports from its own range (services.launcher.port_slice), so two clusters never race for one.
if os.environ.get("PYTEST_XDIST_WORKER", "").startswith("gw"):
    os.environ["KVFERRY_PORT_SLICE"] = (f"{int(os.environ['PYTEST_XDIST_WORKER'][2:])}/"
                                        f"{os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1')}")


# ---- markers ---------------------------------------------------------------------------------------
# `e2e`: the test starts processes or a local cluster, or runs real engines behind real sockets for
# seconds. `make test` runs everything (-m "not vllm"); `make test-fast` leaves these out (-m "not vllm
# and not e2e"). Every test_e2e_*.py and test_bench_*.py module is e2e by its name; the modules below
# as a whole; other e2e tests carry @pytest.mark.e2e (or a module-level pytestmark).
E2E_PREFIXES = ("test_e2e_", "test_bench_")
E2E_MODULES = {"test_up", "test_cli", "test_smollm2", "test_metrics_cluster", "test_migration"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: starts processes or a cluster, or runs engines for seconds "
                                       "(in make test; left out of make test-fast)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module is not None else ""
        if module.startswith(E2E_PREFIXES) or module in E2E_MODULES:
            item.add_marker(pytest.mark.e2e)


@dataclass
class Streams:
    """What a frontend receives: per request, the tokens in order (checked: each index once, no gap)."""

    tokens: dict[str, list[int]] = field(default_factory=dict)
    finish: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def feed(self, outputs) -> None:  # noqa: ANN001 - list[RequestOutput]
        for out in outputs:
            got = self.tokens.setdefault(out.request_id, [])
            assert out.request_id not in self.finish, f"{out.request_id}: output after it finished"
            if out.new_token_ids:
                assert out.first_index == len(got), (
                    f"{out.request_id}: token index {out.first_index} after {len(got)} tokens (gap or repeat)")
                got.extend(out.new_token_ids)
            if out.finished:
                self.finish[out.request_id] = out.finish_reason
                if out.error:
                    self.errors[out.request_id] = out.error


def run_until_idle(engine, streams: Streams | None = None, max_steps: int = 20_000,
                   check: bool = True) -> Streams:  # noqa: ANN001
    """Step the engine until it has no work; returns the streams (never hangs: max_steps)."""
    streams = streams if streams is not None else Streams()
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        streams.feed(engine.step())
        if check:
            engine.check_integrity()
    else:
        raise AssertionError(f"engine still busy after {max_steps} steps")
    return streams


@pytest.fixture
def drain():
    """`drain(engine, streams=None)`: step to idle, collecting each request's stream."""
    return run_until_idle


@pytest.fixture
def make_streams():
    return Streams


# ---- random Hugging Face Llama folders ---------------------------------------------------------

BASE_LLAMA: dict[str, Any] = dict(
    vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
    bos_token_id=None, eos_token_id=None, pad_token_id=None,
)


@dataclass
class HFLlama:
    path: Path
    model: Any  # transformers LlamaForCausalLM, float32, eval mode
    config: dict[str, Any]

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """transformers' own greedy decode of one prompt: exactly n new tokens (no EOS stop)."""
        out = self.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
        new = out[0, len(prompt):].tolist()
        assert len(new) == n, "transformers stopped early"
        return new


@pytest.fixture(scope="session")
def hf_llama_factory(tmp_path_factory):
    """`make(name, **config_overrides)`: a random-weight LlamaForCausalLM saved as a Hugging Face folder.

    Weight matrices (not norms) are scaled up 4x so that greedy outputs vary instead of repeating one token.
    Built once per (name, overrides) per session.
    """
    cache: dict[str, HFLlama] = {}

    def make(name: str = "base", seed: int = 0, **overrides: Any) -> HFLlama:
        if name in cache:
            return cache[name]
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(**{**BASE_LLAMA, **overrides})
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).float().eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "norm" not in pname:
                    p.mul_(4.0)
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        path = tmp_path_factory.mktemp(f"hf-llama-{name}")
        model.save_pretrained(path, safe_serialization=True)
        cache[name] = HFLlama(path, model, {**BASE_LLAMA, **overrides})
        return cache[name]

    return make


@pytest.fixture(scope="session")
def hf_llama(hf_llama_factory) -> HFLlama:
    """The default random Llama: hidden 64, 2 layers, 4 heads, 2 KV heads (GQA), vocab 512."""
    return hf_llama_factory("base")


# ---- GGUF writing --------------------------------------------------------------------------------

_GGUF_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _llama_cpp_permute(w, n_head: int):  # noqa: ANN001, ANN202
    """llama.cpp's convert script: interleave the two rotary halves of each head's q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path: Path, hf: HFLlama, bad_tensor: str | None = None, bad_type: str = "Q8_1",
                     skip_keys: tuple[str, ...] = ()) -> Path:
    """Write `hf`'s weights as a llama GGUF with a byte-level gpt2 tokenizer (vocab must be 259).

    `bad_tensor` (a GGUF tensor name) is stored as `bad_type` raw bytes instead of float32.
    `skip_keys` leaves out metadata setters by name (e.g. "add_head_count").
    """
    import gguf
    import numpy as np

    from engine.weights.tiny import SPECIAL_TOKENS, bytes_to_unicode

    c = hf.config
    assert c["vocab_size"] == 256 + len(SPECIAL_TOKENS)
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    w = gguf.GGUFWriter(str(path), "llama")
    meta = {
        "add_context_length": c["max_position_embeddings"], "add_embedding_length": c["hidden_size"],
        "add_block_count": c["num_hidden_layers"], "add_feed_forward_length": c["intermediate_size"],
        "add_head_count": c["num_attention_heads"], "add_head_count_kv": c["num_key_value_heads"],
        "add_rope_dimension_count": head_dim, "add_layer_norm_rms_eps": c["rms_norm_eps"],
        "add_rope_freq_base": 10000.0, "add_tokenizer_model": "gpt2",
        "add_token_list": bytes_to_unicode() + list(SPECIAL_TOKENS), "add_token_merges": [],
        "add_token_types": [1] * 256 + [3] * len(SPECIAL_TOKENS), "add_eos_token_id": 258,
    }
    for setter, value in meta.items():
        if setter not in skip_keys:
            getattr(w, setter)(value)
    for key, tensor in hf.model.state_dict().items():
        a = tensor.detach().numpy().astype(np.float32)
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        elif key == "lm_head.weight":
            name = "output.weight"
        else:
            _, _, layer, rest = key.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            name = f"blk.{layer}.{_GGUF_LAYER[module]}.{suffix}"
            if module == "self_attn.q_proj":
                a = _llama_cpp_permute(a, c["num_attention_heads"])
            elif module == "self_attn.k_proj":
                a = _llama_cpp_permute(a, c["num_key_value_heads"])
        if name == bad_tensor:
            qtype = gguf.GGMLQuantizationType[bad_type]
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            raw = np.zeros((a.shape[0], a.shape[1] // block * type_size), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=qtype)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def hf_llama_259(hf_llama_factory) -> HFLlama:
    """A random Llama whose vocabulary (259) matches the byte-level tokenizer written into test GGUFs."""
    return hf_llama_factory("vocab259", seed=1, vocab_size=259)


@pytest.fixture
def gguf_writer():
    """`write(path, hf, bad_tensor=None, bad_type="Q8_1", skip_keys=())` -> path of a llama GGUF."""
    return write_llama_gguf


# ---- the shared 3-worker torch cluster ------------------------------------------------------------

_SHARED: dict[str, Any] = {}  # session clusters that are up, by fixture name
_LAST_USER: dict[str, str] = {}  # fixture name -> node id of the last test that uses it


def pytest_collection_finish(session: pytest.Session) -> None:
    for item in session.items:
        if "tiny3_cluster" in getattr(item, "fixturenames", ()):
            _LAST_USER["tiny3_cluster"] = item.nodeid


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):  # noqa: ANN201
    yield
    # Stop a shared cluster right after its last test (LocalCluster.stop is idempotent: the fixture's
    # own teardown at the session's end does nothing then), not idle beside the remaining tests.
    for name, nodeid in _LAST_USER.items():
        if item.nodeid == nodeid and name in _SHARED:
            _SHARED.pop(name).stop()


@pytest.fixture(scope="session")
def tiny3_cluster():
    """Scheduler, 3 torch `tiny` workers, frontend (tests/test_e2e_failures.py: start_tiny3), started
    once for the modules that use it (test_e2e_failures, test_e2e_migration)."""
    from tests.test_e2e_failures import start_tiny3

    c = _SHARED["tiny3_cluster"] = start_tiny3()
    try:
        yield c
    finally:
        _SHARED.pop("tiny3_cluster", None)
        c.stop()


@pytest.fixture
async def tiny3(tiny3_cluster):
    """The shared cluster, whole and idle; restored after the test (killed services respawned,
    drains undone) whatever the test did, so that no test depends on another one's outcome."""
    from tests.test_e2e_failures import restore

    await restore(tiny3_cluster)
    try:
        yield tiny3_cluster
    finally:
        await restore(tiny3_cluster)
