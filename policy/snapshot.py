"""Load snapshots: what the policy knows about an instance (from its latest load report)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RequestLoad:
    """One request on an instance."""

    request_id: str
    priority: int
    num_blocks: int
    num_tokens: int
    running: bool = True


@dataclass(frozen=True)
class InstanceLoad:
    """An instance's load as of its last report."""

    instance_id: str
    total_blocks: int
    free_blocks: int
    num_running: int
    num_waiting: int
    head_of_line_blocks: int = 0  # blocks the first queued request needs (0: none queued)
    requests: tuple[RequestLoad, ...] = field(default_factory=tuple)
    draining: bool = False
    alive: bool = True
    max_running: int | None = None  # instance refuses new requests beyond this many running + waiting
    queued_prefill_tokens: int = 0  # prompt tokens still to prefill (waiting requests, unfinished chunked prefills)
    block_size: int = 16  # tokens per KV block (turns the priority load cap, in tokens, into blocks)
    role: str = "mixed"  # prefill | decode | mixed (policy.pd; honoured when PolicyConfig.pd_mode is not "off")

    @property
    def used_blocks(self) -> int:
        return self.total_blocks - self.free_blocks

    @property
    def full(self) -> bool:
        return self.max_running is not None and self.num_running + self.num_waiting >= self.max_running
