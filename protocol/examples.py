"""One valid example of every message type.

For tests, docs and fuzzing: mutate these to exercise a live endpoint (design §6) — a registered
message type without an example here fails the protocol tests.
"""

from __future__ import annotations

from protocol.base import Message, deadline_in
from protocol.client import CancelGenerate, ChatMessage, GenerateChunk, GenerateChunks, GenerateRequest, Usage
from protocol.common import Ack, ErrorReply, Heartbeat, Ping, Pong
from protocol.payloads import MigratableState, RequestLoadEntry, SamplingParams, TensorSpec, WorkerEndpoints
from protocol.to_frontend import (
    DispatchReply,
    InstanceStatus,
    RequestLocation,
    RequestMoved,
    ScaleAdvice,
    ScalingStatus,
    StatusReply,
    TokenBatch,
    TokenBatches,
)
from protocol.to_scheduler import (
    Deregister,
    DispatchRequest,
    DrainInstance,
    KvEvents,
    LoadReport,
    MigrateRequestTo,
    MigrationResult,
    RegisterWorker,
    ScaleQuery,
    SetInstanceRole,
    StatusRequest,
    UndrainInstance,
)
from protocol.to_worker import (
    AbortRequest,
    AddRequest,
    BlocksAck,
    CancelMigration,
    CommitAck,
    DecodeTarget,
    Drain,
    MigrateAbort,
    MigrateBlocks,
    MigrateCommand,
    MigrateCommit,
    MigrateReserve,
    RegisterReply,
    ReserveReply,
    ResyncKvEvents,
    SetRole,
    Shutdown,
)

ENDPOINTS = WorkerEndpoints(control="tcp://127.0.0.1:17200", migration="tcp://127.0.0.1:17201")
SAMPLING = SamplingParams(max_tokens=64, temperature=0.7, top_p=0.9, top_k=40, seed=1234,
                          stop_token_ids=[2, 7], ignore_eos=False)


def example_messages() -> list[Message]:
    """A fresh list with one instance of each message type (deadlines 60 s from now)."""
    dl = deadline_in(60)
    state = MigratableState(state_version=1, request_id="cmpl-1", token_ids=[1, 2, 3, 4, 5], num_prompt_tokens=3,
                            num_computed_tokens=4, sampling=SAMPLING, priority=1, num_preemptions=0, age_s=0.25,
                            generator_state=b"\x00" * 16)
    return [
        # common
        ErrorReply(reply_to="m-1", code="invalid", message="bad field"),
        Ack(reply_to="m-1", ok=True, detail="done"),
        Heartbeat(sender_id="worker-0", role="worker", seq=7, sent_ms=dl),
        Ping(sender_id="scheduler", deadline_ms=dl),
        Pong(reply_to="m-1", sender_id="worker-0", sent_ms=dl),
        # to the scheduler
        RegisterWorker(worker_id="worker-0", endpoints=ENDPOINTS, host="localhost", engine="torch",
                       model="smollm2", total_blocks=1024, block_size=16, kv_bytes_per_block=65536,
                       max_running=64, pid=1234, kv_namespace=0x9E3779B97F4A7C15, deadline_ms=dl),
        LoadReport(worker_id="worker-0", seq=42, sent_ms=dl, total_blocks=1024, free_blocks=1000, num_running=1,
                   num_waiting=1, num_preemptions=3, head_of_line_blocks=5, queued_prefill_tokens=70,
                   num_cached_blocks=40,
                   requests=[RequestLoadEntry(request_id="cmpl-1", priority=0, num_blocks=24, num_tokens=380),
                             RequestLoadEntry(request_id="cmpl-2", priority=-1, num_blocks=0, num_tokens=70,
                                              running=False)],
                   draining=False, max_running=64),
        Deregister(worker_id="worker-0", reason="sigterm"),
        MigrationResult(migration_id="mig-1", request_id="cmpl-1", src_worker_id="worker-0",
                        dst_worker_id="worker-1", outcome="committed", stages=3, blocks=24, bytes_moved=1 << 20,
                        downtime_ms=12.5),
        DispatchRequest(request_id="cmpl-1", priority=0, num_prompt_tokens=40, max_tokens=32, frontend_id="fe-0",
                        exclude_workers=["worker-3"], block_hashes=[0xFFFFFFFFFFFFFFFF, 17],
                        kv_namespace=0x9E3779B97F4A7C15, kv_block_size=16, deadline_ms=dl),
        StatusRequest(include_requests=True, deadline_ms=dl),
        MigrateRequestTo(request_id="cmpl-1", dst_worker_id="worker-1", deadline_ms=dl),
        DrainInstance(worker_id="worker-0", deadline_ms=dl),
        SetInstanceRole(worker_id="worker-1", role="prefill", deadline_ms=dl),
        UndrainInstance(worker_id="worker-0", deadline_ms=dl),
        # to workers
        AddRequest(request_id="cmpl-1", prompt_token_ids=[1, 2, 3], sampling=SAMPLING, priority=0,
                   frontend_id="fe-0", reply_address="tcp://127.0.0.1:17102", first_index=0, deadline_ms=dl),
        AbortRequest(request_id="cmpl-1", reason="client disconnected", deadline_ms=dl),
        RegisterReply(reply_to="m-1", accepted=True, scheduler_id="sched-0", heartbeat_interval_ms=500,
                      report_interval_ms=50),
        MigrateCommand(migration_id="mig-1", request_id="cmpl-1", dst_worker_id="worker-1",
                       dst_endpoint=ENDPOINTS.migration, reason="load", deadline_ms=dl),
        CancelMigration(migration_id="mig-1", deadline_ms=dl),
        Drain(draining=True, deadline_ms=dl),
        SetRole(role="decode", deadline_ms=dl),
        DecodeTarget(worker_id="worker-1", migration_endpoint=ENDPOINTS.migration, deadline_ms=dl),
        Shutdown(drain_first=True, reason="scale-in", deadline_ms=dl),
        MigrateReserve(migration_id="mig-1", request_id="cmpl-1", src_worker_id="worker-0", stage=0,
                       num_blocks=24, block_size=16, kv_bytes_per_block=65536, deadline_ms=dl),
        ReserveReply(reply_to="m-1", migration_id="mig-1", ok=True, block_ids=list(range(24))),
        MigrateBlocks(migration_id="mig-1", stage=0, dst_block_ids=[0, 1],
                      tensors=[TensorSpec(dtype="bfloat16", shape=[2, 2, 16, 2, 64])], deadline_ms=dl),
        BlocksAck(reply_to="m-1", migration_id="mig-1", ok=True),
        MigrateCommit(migration_id="mig-1", state=state, frontend_id="fe-0",
                      reply_address="tcp://127.0.0.1:17102", next_index=2, deadline_ms=dl),
        CommitAck(reply_to="m-1", migration_id="mig-1", ok=True),
        MigrateAbort(migration_id="mig-1", reason="timeout"),
        # to frontends
        TokenBatch(request_id="cmpl-1", first_index=0, token_ids=[9, 8], worker_id="worker-0"),
        TokenBatches(worker_id="worker-0", batches=[
            TokenBatch(request_id="cmpl-1", first_index=2, token_ids=[7], worker_id="worker-0"),
            TokenBatch(request_id="cmpl-2", first_index=5, finish_reason="error", error="engine failed",
                       worker_id="worker-0"),
        ]),
        RequestMoved(request_id="cmpl-1", worker_id="worker-1", control_endpoint=ENDPOINTS.control, next_index=3),
        DispatchReply(reply_to="m-1", request_id="cmpl-1", worker_id="worker-0",
                      worker_address=ENDPOINTS.control, kv_namespace=0x9E3779B97F4A7C15, kv_block_size=16),
        StatusReply(reply_to="m-1", scheduler_id="sched-0", policy="load",
                    instances=[InstanceStatus(worker_id="worker-0", endpoints=ENDPOINTS, host="localhost",
                                              engine="torch", model="smollm2", total_blocks=1024,
                                              free_blocks=1000, block_size=16, num_running=1, num_waiting=0,
                                              freeness=float("inf"), last_report_ms=dl, cached_blocks=40,
                                              indexed_blocks=38)],
                    requests=[RequestLocation(request_id="cmpl-1", worker_id="worker-0", num_tokens=380)],
                    instance_seconds=1234.5,
                    scaling=ScalingStatus(min_instances=1, max_instances=4, average_freeness=12.5,
                                          manager_id="kvferry-up", last_action="down", last_action_ms=dl,
                                          scale_ups=3, scale_downs=1, retiring=["worker-2"])),
        # pool manager <-> scheduler (listed last: tests index the earlier examples)
        ScaleQuery(manager_id="kvferry-up", workers=["worker-0", "worker-1", "worker-2"], deadline_ms=dl),
        ScaleAdvice(reply_to="m-1", scheduler_id="sched-0", enabled=True, start=1, stop=["worker-2"],
                    retiring=["worker-2"], serving=2, average_freeness=7.5, instance_seconds=1234.5),
        # KV events, worker <-> scheduler
        KvEvents(worker_id="worker-0", seq=3, reset=True, stored=[1, 0xFFFFFFFFFFFFFFFF], removed=[]),
        KvEvents(worker_id="worker-0", seq=4, stored=[5], removed=[1]),
        ResyncKvEvents(scheduler_id="sched-0", reason="gap: expected seq 5, got 7"),
        # SDK <-> frontend
        GenerateRequest(messages=[ChatMessage(role="user", content="Hi")], sampling=SAMPLING, stop=["\n\n"],
                        priority=1, stream=True, deadline_ms=dl, api_key="sk-example"),
        GenerateChunk(reply_to="m-1", request_id="sdk-1", text="Hello", token_ids=[9, 8], first_index=0,
                      finish_reason="stop", usage=Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)),
        GenerateChunks(chunks=[GenerateChunk(reply_to="m-1", request_id="sdk-1", text=" world", token_ids=[7],
                                             first_index=2),
                               GenerateChunk(reply_to="m-2", request_id="sdk-2", text="Hi", token_ids=[5], first_index=0)]),
        CancelGenerate(target="m-1"),
    ]
