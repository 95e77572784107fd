"""Settings of a simulated cluster (the policy's own settings are in policy.PolicyConfig)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.errors import ConfigError
from engine.sim.latency import PROFILES, LatencyModel


@dataclass(frozen=True)
class TransferModel:
    """Time to move KV blocks between instances: per-message overhead + bytes / bandwidth.

    Defaults: 10 GB/s (a PCIe 4.0 x16 path through pinned host memory, or a 100 Gb/s network)
    and 1 ms per message (the control round trip and launch of a copy)."""

    gb_per_s: float = 10.0
    overhead_s: float = 0.001

    def seconds(self, nbytes: int) -> float:
        return self.overhead_s + nbytes / (self.gb_per_s * 1e9)


@dataclass(frozen=True)
class SimConfig:
    """A cluster of `instances` identical sim-engine instances (the paper's setup by default:
    16 x LLaMA-7B on one A10 each), their load reports, migration costs and scaling start-up."""

    instances: int = 16
    latency: str = "llama7b-a10"  # a profile of engine.sim.latency.PROFILES
    block_size: int = 16
    max_num_seqs: int = 256  # vLLM's default batch limit (the paper's engine)
    # 0: the longest request, i.e. every prompt is prefilled in one step, as vLLM without chunked
    # prefill (the paper's engine). The engine's chunked prefill admits a first chunk without room
    # for the whole prompt, and under memory pressure a long prompt is then preempted over and over.
    max_num_batched_tokens: int = 0
    watermark: float = 0.01
    report_interval_s: float = 0.05  # workers report load at most this often (live default: 50 ms)
    sample_interval_s: float = 0.1  # fragmentation samples
    transfer: TransferModel = field(default_factory=TransferModel)
    migration_final_blocks: int = 2  # last stage once at most this many complete blocks are left to copy
    migration_max_stages: int = 8  # ... or after this many pre-copy stages
    scaling: bool = False  # run policy.scaling_decision (its bounds and thresholds: PolicyConfig)
    scale_check_s: float = 1.0  # how often scaling is evaluated (PolicyConfig.scale_interval_s spaces actions)
    startup_s: float = 10.0  # from starting an instance until it serves (it is paid for meanwhile)
    # Prefill/decode roles (policy.pd; honoured with PolicyConfig.pd_mode "fixed" or "adaptive"):
    # the first `prefill_instances` instances are prefill, the next `decode_instances` decode, the rest mixed.
    prefill_instances: int = 0
    decode_instances: int = 0

    def role(self, index: int) -> str:
        if index < self.prefill_instances:
            return "prefill"
        if index < self.prefill_instances + self.decode_instances:
            return "decode"
        return "mixed"

    def __post_init__(self) -> None:
        if self.instances < 1:
            raise ConfigError("a simulated cluster needs at least one instance")
        if self.latency not in PROFILES:
            raise ConfigError(f"unknown latency profile {self.latency!r} (known: {', '.join(PROFILES)})")
        for name in ("report_interval_s", "sample_interval_s", "scale_check_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")
        if self.prefill_instances < 0 or self.decode_instances < 0 or \
                self.prefill_instances + self.decode_instances > self.instances:
            raise ConfigError("prefill + decode instances must be within the instances")
        if self.startup_s < 0 or not self.transfer.gb_per_s > 0 or self.transfer.overhead_s < 0:
            raise ConfigError("startup_s and the transfer overhead must be >= 0, the bandwidth positive")

    @property
    def latency_model(self) -> LatencyModel:
        return PROFILES[self.latency]

    def engine_config(self, max_model_len: int) -> EngineConfig:
        return EngineConfig(block_size=self.block_size, max_num_seqs=self.max_num_seqs,
                            max_num_batched_tokens=self.max_num_batched_tokens or max_model_len,
                            watermark=self.watermark)

    @property
    def bytes_per_block(self) -> int:
        return self.latency_model.kv_bytes_per_token * self.block_size
