"""Live migration between two engine instances, through the engine's public migration API.

The invariant (docs/design.md §5): a migrated request produces exactly the tokens it would have produced
without migration (greedy and seeded sampling), the frontend receives each token once and in order, and
aborted migrations leave the request where it was and leak no block. Run for the built-in `tiny` model
and for a random Hugging Face folder.
"""

from __future__ import annotations

import pytest
import torch
from msgspec.structs import replace

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.block_manager import blocks_for
from engine.errors import MigrationError, OutOfBlocksError
from engine.request import RequestStatus

BLOCK = 4
NEW = 24
GREEDY = SamplingParams(max_tokens=NEW, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=NEW, temperature=0.8, top_p=0.9, seed=1234, ignore_eos=True)
# Penalties, bias, min-p and min_tokens depend on the request's own tokens only: they move with it.
SHAPED = SamplingParams(max_tokens=NEW, temperature=0.9, seed=77, presence_penalty=0.6, frequency_penalty=0.4,
                        repetition_penalty=1.2, min_p=0.02, logit_bias={3: 2.5, 7: -50.0}, min_tokens=4,
                        ignore_eos=True, logprobs=2)
SAMPLINGS = {"greedy": GREEDY, "seeded": SEEDED, "shaped": SHAPED}


def config(**kw) -> EngineConfig:
    return EngineConfig(**{"dtype": "float32", "block_size": BLOCK, "num_blocks": 96, "watermark": 0.0,
                           "debug_checks": True, **kw})


@pytest.fixture(scope="module", params=["tiny", "hf"])
def model(request, hf_llama) -> tuple[str, int]:
    """(model spec, vocab size)."""
    return ("tiny", 259) if request.param == "tiny" else (str(hf_llama.path), hf_llama.config["vocab_size"])


@pytest.fixture(scope="module")
def engines(model):
    """Two separate instances of the same model: A (source) and B (destination)."""
    return LLMEngine.from_model(model[0], config()), LLMEngine.from_model(model[0], config())


@pytest.fixture
def ab(engines):
    """A and B, checked clean after the test (and cleaned, so one failure does not cascade)."""
    a, b = engines
    yield a, b
    clean = True
    for eng in (a, b):
        for rid in list(eng.requests):
            clean = False
            eng.abort_request(rid)
        for key in list(eng.reservations):
            clean = False
            eng.release(key)
    for eng in (a, b):
        eng.check_integrity()
        assert eng.blocks.num_used == 0
    assert clean, "the test left requests or reservations behind"


def prompts(vocab: int) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(7)
    return {name: torch.randint(0, vocab, (n,), generator=g).tolist()
            for name, n in (("target", 13), ("other1", 5), ("other2", 22), ("fill1", 30), ("fill2", 9))}


def reference(eng: LLMEngine, prompt: list[int], sampling: SamplingParams, drain, tag: str) -> list[int]:
    """The target's tokens in an uninterrupted run on the source engine, next to the same neighbours."""
    eng.add_request(f"ref-{tag}", prompt, sampling)
    eng.add_request(f"ref-{tag}-n", [1, 2, 3], GREEDY)
    streams = drain(eng)
    return streams.tokens[f"ref-{tag}"]


def start_workload(a: LLMEngine, b: LLMEngine, p: dict, sampling: SamplingParams, tag: str, streams) -> str:
    """Target plus neighbours on A; two unrelated requests already holding low block ids on B."""
    rid = f"t-{tag}"
    a.add_request(rid, p["target"], sampling)
    a.add_request(f"{rid}-o1", p["other1"], GREEDY)
    a.add_request(f"{rid}-o2", p["other2"], SEEDED)
    b.add_request(f"{rid}-f1", p["fill1"], GREEDY)
    b.add_request(f"{rid}-f2", p["fill2"], GREEDY)
    streams.feed(b.step())
    assert b.blocks.num_used > 0
    return rid


def step_until(eng: LLMEngine, rid: str, num_output: int, streams) -> None:
    req = eng.requests[rid]
    for _ in range(500):
        if req.num_output_tokens >= num_output:
            return
        streams.feed(eng.step())
    raise AssertionError(f"{rid} never reached {num_output} output tokens")


def migrate(a: LLMEngine, b: LLMEngine, rid: str, streams, precopy_steps: int = 0) -> None:
    """Multi-stage pre-copy: copy the complete blocks while the request keeps decoding on A for
    `precopy_steps` steps, then detach it, copy the rest (incl. the partial last block), commit on B,
    free on A."""
    key = f"mig-{rid}"
    sent = 0
    if precopy_steps:
        sent = a.num_complete_blocks(rid)
        assert sent > 0
        dst = b.reserve(key, sent)
        src = a.block_table(rid)[:sent]
        b.write_blocks(dst, a.read_blocks(src))
        for _ in range(precopy_steps):  # the request keeps running on A; B serves its own
            streams.feed(a.step())
            streams.feed(b.step())
    state = a.detach_request(rid)
    assert rid in a.detached and a.requests[rid].status is RequestStatus.WAITING
    table = a.block_table(rid)
    need = blocks_for(state.num_computed_tokens, a.blocks.block_size)
    assert len(table) >= need > sent
    rest = b.reserve(key, need - sent)
    b.write_blocks(rest, a.read_blocks(table[sent:need]))
    dst_table = b.block_table(key)
    assert len(dst_table) == need and dst_table != table[:need], "B must place the KV in other block ids"
    assert torch.equal(b.read_blocks(dst_table), a.read_blocks(table[:need]))
    committed = b.commit_request(state, key)
    assert committed.status is RequestStatus.RUNNING and key not in b.reservations
    assert b.block_table(rid) == dst_table
    assert a.release(rid) == len(table)
    assert rid not in a.requests and a.blocks.num_owned(rid) == 0


@pytest.mark.parametrize("kind", ["greedy", "seeded", "shaped"])
@pytest.mark.parametrize("at,precopy", [(1, 0), (1, 2), (10, 3), (22, 0)],
                         ids=["after-prefill", "after-prefill-precopy", "mid-decode-precopy", "late"])
def test_migrated_request_produces_the_uninterrupted_tokens(ab, model, drain, make_streams, kind, at, precopy):
    """Migrate the target from A to B after `at` output tokens: its full stream (A's part then B's part)
    equals an uninterrupted run; the neighbours on both engines are unaffected."""
    a, b = ab
    p = prompts(model[1])
    sampling = SAMPLINGS[kind]
    tag = f"{kind}-{at}-{precopy}"
    want = reference(a, p["target"], sampling, drain, tag)
    assert len(want) == NEW
    streams = make_streams()
    rid = start_workload(a, b, p, sampling, tag, streams)
    step_until(a, rid, at, streams)
    migrate(a, b, rid, streams, precopy_steps=precopy)
    drain(a, streams)
    drain(b, streams)
    assert streams.tokens[rid] == want
    assert all(len(t) == NEW for t in streams.tokens.values())
    assert len(streams.finish) == 5


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_migrating_a_waiting_request_is_a_plain_move(ab, model, drain, kind):
    """A request not yet prefilled has no KV: commit with no reservation queues it on B."""
    a, b = ab
    p = prompts(model[1])
    want = reference(a, p["target"], SAMPLINGS[kind], drain, f"wait-{kind}")
    rid = f"w-{kind}"
    a.add_request(rid, p["target"], SAMPLINGS[kind])
    state = a.detach_request(rid)
    assert state.num_computed_tokens == 0 and a.block_table(rid) == []
    req = b.commit_request(state, None)
    assert req.status is RequestStatus.WAITING
    assert a.release(rid) == 0 and rid not in a.requests
    streams = drain(b)
    assert streams.tokens[rid] == want


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_migrating_a_preempted_request_recomputes_on_the_destination(model, drain, make_streams, kind):
    """A request preempted on A (waiting, with output tokens and no KV) moves with its tokens and
    generator state; B recomputes its prompt + output and continues with the uninterrupted tokens."""
    p = prompts(model[1])
    ref_eng = LLMEngine.from_model(model[0], config(num_blocks=96))
    want = reference(ref_eng, p["target"], SAMPLINGS[kind], drain, kind)
    a = LLMEngine.from_model(model[0], config(num_blocks=16))  # 3 requests x 10 blocks do not fit
    b = ref_eng
    streams = make_streams()
    a.add_request("n1", p["target"], GREEDY)
    a.add_request("n2", p["target"], GREEDY)
    target = a.add_request("t", p["target"], SAMPLINGS[kind])  # latest arrival: preempted first
    for _ in range(200):
        if target.num_preemptions:
            break
        streams.feed(a.step())
    assert target.num_preemptions == 1 and target.status is RequestStatus.WAITING and target.num_output_tokens > 0
    state = a.detach_request("t")
    b.commit_request(state, None)
    a.release("t")
    drain(a, streams)
    drain(b, streams)
    assert streams.tokens["t"] == want
    for eng in (a, b):
        eng.check_integrity()
        assert eng.blocks.num_used == 0


# ---- aborted migrations ------------------------------------------------------------------------


def test_commit_with_too_few_blocks_fails_and_the_request_resumes_on_the_source(ab, model, drain, make_streams):
    """B's reservation is one block short: commit raises MigrationError and changes nothing on B; the
    reservation is released, A reattaches the request, and it finishes with the uninterrupted tokens."""
    a, b = ab
    p = prompts(model[1])
    want = reference(a, p["target"], GREEDY, drain, "short")
    streams = make_streams()
    rid = start_workload(a, b, p, GREEDY, "short", streams)
    step_until(a, rid, 6, streams)
    state = a.detach_request(rid)
    need = blocks_for(state.num_computed_tokens, BLOCK)
    used_before = b.blocks.num_used
    dst = b.reserve("short-key", need - 1)
    b.write_blocks(dst, a.read_blocks(a.block_table(rid)[: need - 1]))
    with pytest.raises(MigrationError, match=f"reservation holds {need - 1} blocks, the request's KV needs {need}"):
        b.commit_request(state, "short-key")
    assert rid not in b.requests and "short-key" in b.reservations
    b.check_integrity()
    assert b.release("short-key") == need - 1
    assert b.blocks.num_used == used_before and "short-key" not in b.reservations
    a.reattach_request(rid)
    assert a.requests[rid].status is RequestStatus.RUNNING and rid not in a.detached
    drain(a, streams)
    drain(b, streams)
    assert streams.tokens[rid] == want


def test_reattach_after_detach_continues_normally(ab, model, drain, make_streams):
    """Detach (last stage of a migration) then reattach (the destination said no): no token is lost or
    repeated, and the output is the uninterrupted one; steps in between do not touch the request."""
    a, _ = ab
    p = prompts(model[1])
    want = reference(a, p["target"], SEEDED, drain, "reattach")
    streams = make_streams()
    a.add_request("ra", p["target"], SEEDED)
    a.add_request("ra-n", p["other2"], GREEDY)
    step_until(a, "ra", 5, streams)
    table = a.block_table("ra")
    a.detach_request("ra")
    for _ in range(3):
        streams.feed(a.step())  # the neighbour runs; the detached request keeps its blocks
    assert len(streams.tokens["ra"]) == 5 and a.block_table("ra") == table
    a.check_integrity()
    a.reattach_request("ra")
    with pytest.raises(MigrationError, match="is not detached"):
        a.reattach_request("ra")
    drain(a, streams)
    assert streams.tokens["ra"] == want


def test_reattach_of_a_detached_waiting_request_requeues_it(ab, model, drain):
    """A request detached before its prefill goes back to the waiting queue and then runs normally."""
    a, _ = ab
    p = prompts(model[1])
    a.add_request("rw", p["target"], GREEDY)
    a.detach_request("rw")
    assert not a.has_unfinished_requests()
    a.reattach_request("rw")
    assert a.requests["rw"].status is RequestStatus.WAITING
    assert len(drain(a).tokens["rw"]) == NEW


def test_release_of_an_unused_reservation_frees_it(ab):
    """Reserved blocks that no one commits come back in full; reservations may grow stage by stage."""
    _, b = ab
    free = b.blocks.num_free
    first = b.reserve("unused", 3)
    more = b.reserve("unused", 2)
    assert len(set(first + more)) == 5 and b.blocks.num_free == free - 5
    b.check_integrity()
    assert b.release("unused") == 5
    assert b.blocks.num_free == free and "unused" not in b.reservations
    assert b.release("unused") == 0


def test_reserve_is_all_or_nothing_and_refuses_live_request_ids(ab):
    """More blocks than are free: OutOfBlocksError and no reservation; a live request id is no reservation key."""
    _, b = ab
    free = b.blocks.num_free
    with pytest.raises(OutOfBlocksError, match="cannot reserve"):
        b.reserve("too-big", free + 1)
    assert b.blocks.num_free == free and "too-big" not in b.reservations
    b.add_request("live", [1, 2, 3], GREEDY)
    with pytest.raises(MigrationError, match="names a live request"):
        b.reserve("live", 1)
    b.abort_request("live")


def test_release_refuses_a_live_request(ab, model):
    """release() frees reservations and detached requests only: a running request's blocks stay its own
    (freeing them would let another request overwrite its KV)."""
    a, _ = ab
    a.add_request("busy", prompts(model[1])["target"], GREEDY)
    a.step()
    owned = a.blocks.num_owned("busy")
    with pytest.raises(MigrationError, match="live request"):
        a.release("busy")
    assert a.blocks.num_owned("busy") == owned
    a.check_integrity()
    a.abort_request("busy")


def test_commit_refusals_leave_no_trace(ab, model):
    """Duplicate request id, wrong state version, tokens out of range: MigrationError, nothing changed."""
    a, b = ab
    b.add_request("dup", [4, 5, 6], GREEDY)
    a.add_request("dup", [4, 5, 6], GREEDY)
    state = a.detach_request("dup")
    used = b.blocks.num_used
    with pytest.raises(MigrationError, match="already here"):
        b.commit_request(state, None)
    with pytest.raises(MigrationError, match="version"):
        b.commit_request(replace(state, request_id="v", state_version=999), None)
    with pytest.raises(MigrationError, match="does not fit this model"):
        b.commit_request(replace(state, request_id="oob", token_ids=[model[1] + 5, 1, 2]), None)
    with pytest.raises(MigrationError, match="invalid request state"):  # a generator state torch refuses
        b.commit_request(replace(state, request_id="g", generator_state=b"\x00"), None)
    assert b.blocks.num_used == used and set(b.requests) == {"dup"}
    b.check_integrity()
    a.release("dup")
    b.abort_request("dup")


def test_remove_request_without_keeping_blocks(ab, model):
    """remove_request exports the state and frees the request's blocks in one call."""
    a, _ = ab
    a.add_request("rm", prompts(model[1])["target"], GREEDY)
    a.step()
    a.step()
    state = a.remove_request("rm")
    assert state.request_id == "rm" and len(state.token_ids) == 13 + 2
    assert "rm" not in a.requests and a.blocks.num_used == 0
    with pytest.raises(MigrationError, match="no live request"):
        a.export_request("rm")
