"""vLLM as a kvferry engine, in process: `VllmEngine` on the tiny model's HF folder (float32).

One vLLM engine per process (its KV-transfer group is process-global), so one module fixture
serves every test here. Oracles: kvferry's own torch engine on the same HF folder (greedy tokens
must be identical) and the same request run unmigrated. Migrations here go through the whole
destination path inside one engine: detach (blocks held by the connector), read the blocks,
release, reserve, write, commit (the connector loads them); the two-process version is
tests/test_e2e_vllm.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from msgspec.structs import replace

pytest.importorskip("vllm")

from engine.config import EngineConfig  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.errors import InvalidRequestError, MigrationError, OutOfBlocksError  # noqa: E402
from engine.request import FinishReason, SamplingParams  # noqa: E402
from engine.vllm_backend.engine import VllmEngine, VllmEngineConfig, resolve_model_folder  # noqa: E402
from protocol.payloads import MigratableState  # noqa: E402
from protocol.payloads import SamplingParams as WireSamplingParams  # noqa: E402

pytestmark = pytest.mark.vllm

BS = 32
PROMPTS = [[(i * 7) % 200 + 1 for i in range(75)], [(i * 13) % 250 + 2 for i in range(5)],
           [(i * 3) % 100 + 20 for i in range(130)]]


@pytest.fixture(scope="module")
def engine() -> VllmEngine:
    e = VllmEngine(VllmEngineConfig(model="tiny", dtype="float32", block_size=BS, kv_cache_bytes=1 << 30,
                                    max_model_len=2048, max_num_seqs=16))
    yield e
    assert e.stats().num_free_blocks == e.num_blocks, "a test leaked KV blocks"
    e.shutdown()


def drain(e: VllmEngine, interrupt=None, at_step: int = 10) -> dict[str, list[int]]:
    """Step until every request finishes; tokens per request, indices checked. `interrupt(e)`
    runs once after `at_step` steps (a dict {step: fn} runs each fn after its step)."""
    plan = interrupt if isinstance(interrupt, dict) else ({at_step: interrupt} if interrupt else {})
    got: dict[str, list[int]] = {}
    steps = 0
    while e.has_unfinished_requests() or e.requests:
        for o in e.step():
            toks = got.setdefault(o.request_id, [])
            assert o.first_index == len(toks), f"{o.request_id}: index {o.first_index}, have {len(toks)}"
            toks += o.new_token_ids
        steps += 1
        e.check_integrity()
        if steps in plan:
            plan[steps](e)
            e.check_integrity()
        assert steps < 2000
    return got


def run(e: VllmEngine, prompts: list[list[int]], sampling: SamplingParams, prefix: str, interrupt=None,
        salt: str = "") -> list:
    for i, p in enumerate(prompts):
        e.add_request(f"{prefix}{i}", p, sampling, cache_salt=salt)
    got = drain(e, interrupt)
    return [got[f"{prefix}{i}"] for i in range(len(prompts))]


def move_within(e: VllmEngine, rid: str, key: str, corrupt: bool = False) -> MigratableState:
    """The migration destination path inside one engine; returns the state that moved."""
    state = e.detach_request(rid)
    n = -(-state.num_computed_tokens // BS)
    data = e.read_blocks(e.block_table(rid)[:n])
    assert e.release(rid) >= n
    ids = e.reserve(key, n)
    e.write_blocks(ids, data.fill_(0.5) if corrupt else data)
    e.commit_request(state, key)
    return state


GREEDY = SamplingParams(max_tokens=40, ignore_eos=True)


def test_vllm_engine_implements_the_engine_contract(engine):
    from engine.interface import Engine
    from tests.test_engine_interface import CONTRACT, PROPERTIES

    assert isinstance(engine, Engine)
    assert [n for n in CONTRACT if not callable(getattr(engine, n, None))] == []
    assert [n for n in PROPERTIES if not isinstance(getattr(type(engine), n, None), property)] == []
    assert not hasattr(engine, "scheduler")  # vLLM's scheduler is its own (engine.num_waiting() etc.)


def test_greedy_tokens_equal_kvferry_engine_on_the_same_hf_folder(engine):
    folder = resolve_model_folder("tiny")
    torch_engine = LLMEngine.from_model(str(folder), EngineConfig(dtype="float32", num_blocks=256))
    want = [r.output_token_ids for r in torch_engine.generate(PROMPTS, GREEDY)]
    assert run(engine, PROMPTS, GREEDY, "eq") == want


def test_request_moved_through_the_connector_continues_identically(engine):
    want = run(engine, PROMPTS[:1], GREEDY, "ref")
    moved: list[MigratableState] = []

    def move(e):
        moved.append(move_within(e, "mv0", "mig:a"))

    got = run(engine, PROMPTS[:1], GREEDY, "mv", move)
    assert got == want
    computed = moved[0].num_computed_tokens
    assert computed > BS
    totals = engine.kv_load_counters()
    assert totals["loaded_tokens"] >= computed  # all of it, the partial last block too
    assert totals["max_recomputed_tokens"] == 0  # vLLM computed only the newest token
    assert not engine.reservations and not engine.connector.plans


def test_wrong_kv_changes_the_output(engine):
    """The loaded KV is what the continuation attends to (it is not recomputed). Its own salt keeps
    vLLM's prefix cache from supplying the blocks instead."""
    want = run(engine, PROMPTS[:1], GREEDY, "ref")
    got = run(engine, PROMPTS[:1], GREEDY, "bad", lambda e: move_within(e, "bad0", "mig:b", corrupt=True),
              salt="corrupt")
    assert got != want


def test_prefix_caching_reuses_blocks_and_keeps_greedy_output(engine):
    """A second run of the same prompts finds their full blocks in vLLM's prefix cache; the tokens
    equal kvferry's engine without caching. Another cache_salt finds nothing."""
    folder = resolve_model_folder("tiny")
    torch_engine = LLMEngine.from_model(str(folder), EngineConfig(dtype="float32", num_blocks=256,
                                                                  prefix_caching=False))
    want = [r.output_token_ids for r in torch_engine.generate(PROMPTS, GREEDY)]
    assert run(engine, PROMPTS, GREEDY, "pc1", salt="pc") == want
    before = engine.stats()
    assert before.num_cached_blocks > 0
    assert run(engine, PROMPTS, GREEDY, "pc2", salt="pc") == want
    after = engine.stats()
    full = sum(len(p) // BS for p in PROMPTS)
    assert after.prefix_query_tokens - before.prefix_query_tokens == sum(map(len, PROMPTS))
    # vLLM recomputes the last prompt token, so a prompt of whole blocks hits one block less.
    assert after.prefix_hit_tokens - before.prefix_hit_tokens >= (full - 1) * BS
    other = engine.stats().prefix_hit_tokens
    assert run(engine, PROMPTS, GREEDY, "pc3", salt="another tenant") == want
    assert engine.stats().prefix_hit_tokens == other


def test_kv_events_carry_the_frontend_s_hashes_of_what_vllm_caches(engine):
    """vLLM's KV cache events, re-hashed (engine/vllm_backend/kv_events.py): after a request, the
    worker reports exactly the hashes a frontend computes for the prompt's full blocks (and, with
    the answer, the blocks completed while decoding), under the request's salt."""
    from engine.interface import kv_event_source
    from protocol.kv_hash import prompt_hashes, root_from_namespace

    assert kv_event_source(engine) is engine and engine.kv_namespace
    engine.enable_kv_events()
    engine.take_kv_events()
    prompt = [(i * 5) % 230 + 7 for i in range(3 * BS + 5)]
    [out] = run(engine, [prompt], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True), "kve", salt="kv-ev")
    root = root_from_namespace(engine.kv_namespace, "kv-ev")
    want = prompt_hashes(prompt + out[:-1], BS, root)  # the last token's KV is never computed
    got = engine.take_kv_events()
    assert not got.reset and got.stored[:3] == prompt_hashes(prompt, BS, root) and set(want) <= set(got.stored)
    assert set(engine.take_kv_events(resync=True).stored) >= set(want)
    assert engine._kv_events.untranslated == 0


def test_destination_holding_the_prefix_loads_only_the_rest(engine):
    """A continuation whose prefix vLLM has cached here: the connector copies only the blocks after
    the local hit (counted as local_hit_tokens), and the output equals the unmigrated one."""
    long_prompt = [(i * 11) % 240 + 3 for i in range(200)]
    want = run(engine, [long_prompt], GREEDY, "lref", salt="held")  # caches the prompt's full blocks
    before = engine.kv_load_counters()
    moved: list[MigratableState] = []
    got = run(engine, [long_prompt], GREEDY, "lmv", lambda e: moved.append(move_within(e, "lmv0", "mig:l")),
              salt="held")
    assert got == want
    after = engine.kv_load_counters()
    local = after["local_hit_tokens"] - before["local_hit_tokens"]
    assert local >= (len(long_prompt) // BS) * BS  # at least the prompt's full blocks were already here
    assert after["max_recomputed_tokens"] == 0
    assert not engine.reservations and not engine.connector.plans


def test_reattach_after_detach_continues_identically(engine):
    want = run(engine, PROMPTS, GREEDY, "ref")

    def detach(e):
        e.detach_request("ra1")
        assert e.migration_view("ra1") is None

    # The others go on for three steps while it is out.
    assert run(engine, PROMPTS, GREEDY, "ra", {10: detach, 13: lambda e: e.reattach_request("ra1")}) == want


def test_seeded_sampling_continues_identically_after_a_move(engine):
    seeded = SamplingParams(max_tokens=30, temperature=1.0, seed=7)
    want = run(engine, PROMPTS[:1], seeded, "sref")
    got = run(engine, PROMPTS[:1], seeded, "smv", lambda e: move_within(e, "smv0", "mig:s"))
    assert got == want


def _outputs(e, rid: str, prompt: list[int], sp: SamplingParams) -> list:
    e.add_request(rid, prompt, sp)
    outs = []
    for _ in range(2000):
        if rid not in e.requests:
            return outs
        outs += [o for o in e.step() if o.request_id == rid]
    raise AssertionError(f"{rid} never finished")


def test_logprobs_and_sampling_controls_equal_the_kvferry_engine(engine):
    """The same HF folder in both engines: vLLM's raw logprobs (its default mode), prompt logprobs
    and the shaped greedy tokens (repetition penalty, logit_bias, min_tokens, min_p) equal ours."""
    folder = resolve_model_folder("tiny")
    ours = LLMEngine.from_model(str(folder), EngineConfig(dtype="float32", num_blocks=256))
    sp = SamplingParams(max_tokens=12, logprobs=3, prompt_logprobs=2, repetition_penalty=1.4,
                        logit_bias={40: 4.0}, min_tokens=3, min_p=0.1)
    a, b = _outputs(engine, "vlp", PROMPTS[1], sp), _outputs(ours, "tlp", PROMPTS[1], sp)
    assert [t for o in a for t in o.new_token_ids] == [t for o in b for t in o.new_token_ids]
    la = [lp for o in a for lp in o.logprobs]
    lb = [lp for o in b for lp in o.logprobs]
    assert [x.logprob for x in la] == pytest.approx([x.logprob for x in lb], abs=1e-3)
    assert [x.top_ids for x in la] == [x.top_ids for x in lb] and [x.rank for x in la] == [x.rank for x in lb]
    pa, pb = a[0].prompt_logprobs, b[0].prompt_logprobs
    assert pa[0] is None and pb[0] is None and len(pa) == len(pb) == len(PROMPTS[1])
    assert [x.logprob for x in pa[1:]] == pytest.approx([x.logprob for x in pb[1:]], abs=1e-3)


def test_presence_and_frequency_penalties_keep_a_request_in_place(engine):
    """vLLM counts them over its own request's output: a continuation elsewhere would reset them,
    so such a request does not migrate (and a resumed one is refused with a clear error)."""
    sp = SamplingParams(max_tokens=30, frequency_penalty=0.5, ignore_eos=True)
    engine.add_request("pen", PROMPTS[0], sp)
    for _ in range(5):
        engine.step()
    with pytest.raises(MigrationError, match="presence/frequency"):
        engine.detach_request("pen")
    while "pen" in engine.requests:
        engine.step()
    with pytest.raises(InvalidRequestError, match="presence or frequency"):
        engine.add_request("pen2", PROMPTS[0], SamplingParams(max_tokens=4, presence_penalty=1.0,
                                                             prior_output_tokens=2))


def test_structured_output_equals_the_kvferry_engine(engine):
    """The same grammar through vLLM's llguidance backend and ours: the same greedy answer; such a
    request stays on its vLLM worker (vLLM's grammar would restart in a continuation)."""
    from protocol.payloads import Grammar

    folder = resolve_model_folder("tiny")
    ours = LLMEngine.from_model(str(folder), EngineConfig(dtype="float32", num_blocks=256))
    for g in (Grammar(kind="regex", spec="[a-e]{3,8}!"), Grammar(kind="lark", spec='start: "ab" | "cd" /[0-9]+/'),
              Grammar(kind="json_schema", spec='{"type": "object", "properties": {"k": {"type": "integer"}}, '
                                               '"required": ["k"]}')):
        sp = SamplingParams(max_tokens=40, grammar=g)
        a = [t for o in _outputs(engine, "vg", PROMPTS[1], sp) for t in o.new_token_ids]
        b = [t for o in _outputs(ours, "tg", PROMPTS[1], sp) for t in o.new_token_ids]
        eos = set(engine.eos_token_ids)
        # vLLM also samples the EOS that a finished grammar forces; ours stops there
        assert [t for t in a if t not in eos] == [t for t in b if t not in eos], g
    engine.add_request("gm", PROMPTS[0], SamplingParams(max_tokens=30, grammar=Grammar(kind="regex", spec="[a-z]+")))
    engine.step()
    with pytest.raises(MigrationError, match="grammar"):
        engine.detach_request("gm")
    while "gm" in engine.requests:
        engine.step()


def test_eos_stops_like_the_kvferry_engine(engine):
    folder = resolve_model_folder("tiny")
    torch_engine = LLMEngine.from_model(str(folder), EngineConfig(dtype="float32", num_blocks=256))
    sp = SamplingParams(max_tokens=200)
    ref = torch_engine.generate(PROMPTS[:1], sp)[0]
    engine.add_request("eos", PROMPTS[0], sp)
    toks, reason = [], None
    while engine.requests:
        for o in engine.step():
            toks += o.new_token_ids
            reason = o.finish_reason if o.finished else reason
    assert toks == ref.output_token_ids
    assert reason == ref.finish_reason


def test_load_report_counts_blocks_and_queues(engine):
    total = engine.num_blocks
    engine.add_request("ld0", PROMPTS[2], GREEDY)
    engine.add_request("ld1", PROMPTS[0], GREEDY)
    s = engine.stats(per_request=True)
    assert (s.num_running, s.num_waiting) == (0, 2) and s.head_of_line_blocks == -(-len(PROMPTS[2]) // BS)
    engine.step()
    s = engine.stats(per_request=True)
    assert s.num_running == 2 and s.num_waiting == 0
    by_id = {r.request_id: r for r in s.requests}
    assert by_id["ld0"].num_blocks == -(-(len(PROMPTS[2]) + 1) // BS) and by_id["ld0"].status == "running"
    assert s.num_free_blocks == total - sum(r.num_blocks for r in s.requests)
    out = engine.abort_request("ld0")
    assert out.finished and out.finish_reason is FinishReason.ABORT
    engine.abort_request("ld1")
    engine.step()
    assert engine.stats().num_free_blocks == total and not engine.requests


def test_bad_requests_and_states_are_refused_and_leak_nothing(engine):
    total = engine.num_blocks
    for prompt in ([], [engine.vocab_size], [-1], ["x"], [1] * 5000):
        with pytest.raises(InvalidRequestError):
            engine.add_request("bad", prompt, GREEDY)
    engine.add_request("dup", [1, 2, 3], GREEDY)
    with pytest.raises(InvalidRequestError):
        engine.add_request("dup", [1, 2, 3], GREEDY)
    with pytest.raises(MigrationError):
        engine.detach_request("nobody")
    with pytest.raises(OutOfBlocksError):
        engine.reserve("huge", total)
    ids = engine.reserve("r", 3)
    assert len(ids) == 3 and engine.stats().num_free_blocks == total - 3
    good = MigratableState(state_version=1, request_id="st", token_ids=[1, 2, 3, 4], num_prompt_tokens=3,
                           num_computed_tokens=3, sampling=WireSamplingParams.from_engine(GREEDY))
    with pytest.raises(ValueError, match="inconsistent"):  # a state with impossible counts cannot be built
        replace(good, num_computed_tokens=9)
    for bad in (replace(good, state_version=9), replace(good, token_ids=[1, 2, engine.vocab_size, 4]),
                replace(good, request_id="dup")):
        with pytest.raises(MigrationError):
            engine.commit_request(bad, "r")
    assert engine.release("r") == 3
    engine.abort_request("dup")
    engine.step()
    assert engine.stats().num_free_blocks == total and not engine.requests


@pytest.mark.slow
def test_smollm2_greedy_tokens_equal_kvferry_engine(tmp_path):
    """SmolLM2-135M-Instruct (the GGUF exported to an HF folder): vLLM in a subprocess
    (`kvferry generate --engine vllm`) and kvferry's engine here, float32, identical tokens."""
    folder = resolve_model_folder("smollm2")
    question = "Name three rivers in Europe and say which one is the longest."
    out = subprocess.run([sys.executable, "-m", "cli.main", "generate", "--engine", "vllm", "--model", str(folder),
                          "--dtype", "float32", "--chat", question, "--max-tokens", "48", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    ours = LLMEngine.from_model(str(folder), EngineConfig(dtype="float32", num_blocks=64))
    ids = ours.tokenizer.encode_chat([{"role": "user", "content": question}])
    want = ours.generate([ids], SamplingParams(max_tokens=48))[0]
    assert got["token_ids"] == want.output_token_ids
    assert got["text"].strip()
