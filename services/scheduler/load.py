"""Convert what a worker told the scheduler into the policy's view of it (policy.InstanceLoad)."""

from __future__ import annotations

from collections.abc import Callable

from protocol import LoadReport, RegisterWorker

from policy import InstanceLoad, RequestLoad


def instance_load(info: RegisterWorker, report: LoadReport | None, *, alive: bool = True,
                  draining: bool = False, include_requests: bool = False,
                  keep_priority: Callable[[int], bool] | None = None, role: str | None = None) -> InstanceLoad:
    """The InstanceLoad of a worker registered with `info` whose latest report is `report`.

    Before its first report a worker counts as empty (all its registered blocks free). It is
    draining when the scheduler drains it (`draining`) or when it says so itself (`report.draining`).
    `max_running` comes from the report, else from the registration. Per-request entries are
    converted only with `include_requests` (they can be thousands), or, with `keep_priority`, only
    those whose priority it accepts: the high-priority ones, which are all the priority headroom of
    the freeness needs (policy.freeness), so dispatch snapshots stay small.
    """
    if report is None:
        return InstanceLoad(
            instance_id=info.worker_id, total_blocks=info.total_blocks, free_blocks=info.total_blocks,
            num_running=0, num_waiting=0, draining=draining, alive=alive, max_running=info.max_running,
            block_size=info.block_size, role=role or info.role)
    requests: tuple[RequestLoad, ...] = ()
    if include_requests:
        requests = tuple(RequestLoad(r.request_id, r.priority, r.num_blocks, r.num_tokens, r.running)
                         for r in report.requests)
    elif keep_priority is not None:
        requests = tuple(RequestLoad(r.request_id, r.priority, r.num_blocks, r.num_tokens, r.running)
                         for r in report.requests if keep_priority(r.priority))
    return InstanceLoad(
        instance_id=info.worker_id,
        total_blocks=report.total_blocks,
        free_blocks=report.free_blocks,
        num_running=report.num_running,
        num_waiting=report.num_waiting,
        head_of_line_blocks=report.head_of_line_blocks,
        queued_prefill_tokens=report.queued_prefill_tokens,
        requests=requests,
        draining=draining or report.draining,
        alive=alive,
        block_size=info.block_size,
        max_running=report.max_running if report.max_running is not None else info.max_running,
        role=role or report.role,
    )
