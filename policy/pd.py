"""Prefill/decode disaggregation (pure): instance roles, where new requests go, where a request
goes once its prefill is done, and (adaptive mode) which instances change role.

Roles: "prefill" instances take new requests and hand each one off by live migration as soon as
its first token is out; "decode" instances take no new requests, only hand-offs (and
load-balancing moves among themselves); "mixed" instances do both (today's behaviour, and every
instance's role when `PolicyConfig.pd_mode` is "off"). A hand-off goes to the freest decode
instance with room for the request's blocks, then to a mixed one; with none, the request stays
and decodes where it is (it is never lost for want of a target).

Adaptive (`pd_mode = "adaptive"`), with hysteresis and at most one change per
`pd_role_interval_s`: while the queued prefill work per prefill-taking instance is above
`pd_prefill_backlog_tokens` and the decode instances have room (average freeness above
`pd_decode_room`), a decode instance turns mixed (takes prefills); while the backlog is below a
quarter of that and the decode instances are short of room (below half of `pd_decode_room`), a
prefill instance turns mixed (keeps its requests to decode). Each goes back to its configured role
when the pressure that lent it is gone (backlog below half, or decode room back).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from policy.config import PolicyConfig
from policy.freeness import freeness
from policy.snapshot import InstanceLoad

ROLES = ("mixed", "prefill", "decode")


def role_of(inst: InstanceLoad, cfg: PolicyConfig | None) -> str:
    """The role the policy honours (every instance is mixed with PD off)."""
    return inst.role if cfg is not None and cfg.pd_mode != "off" else "mixed"


def takes_new(inst: InstanceLoad, cfg: PolicyConfig | None) -> bool:
    return role_of(inst, cfg) != "decode"


def takes_decode(inst: InstanceLoad, cfg: PolicyConfig | None) -> bool:
    return role_of(inst, cfg) != "prefill"


def dispatch_candidates(cands: Sequence[InstanceLoad], cfg: PolicyConfig | None) -> list[InstanceLoad]:
    """The instances a new request may go to: the prefill-capable ones (all, if none is)."""
    pre = [i for i in cands if takes_new(i, cfg)]
    return pre or list(cands)


def hands_off(inst: InstanceLoad, cfg: PolicyConfig | None) -> bool:
    """Whether requests on `inst` move to a decode instance once their prefill is done."""
    return role_of(inst, cfg) == "prefill"


def handoff_target(instances: Sequence[InstanceLoad], cfg: PolicyConfig, need_blocks: int,
                   exclude: Collection[str] = ()) -> str | None:
    """Where a prefilled request needing `need_blocks` blocks decodes: the freest decode instance
    with room, else the freest mixed one; None if none has room."""
    for role in ("decode", "mixed"):
        ok = [i for i in instances if i.alive and not i.draining and not i.full and role_of(i, cfg) == role
              and i.instance_id not in exclude and i.free_blocks >= need_blocks]
        if ok:
            return max(sorted(ok, key=lambda i: i.instance_id), key=lambda i: freeness(i, cfg=cfg)).instance_id
    return None


@dataclass
class RoleState:
    """What adaptive roles remember: each instance's configured role and the last change."""

    configured: dict[str, str]
    last_change_s: float = float("-inf")


def role_changes(instances: Sequence[InstanceLoad], cfg: PolicyConfig, state: RoleState,
                 now_s: float) -> list[tuple[str, str]]:
    """(instance id, new role) to apply now (adaptive mode; at most one change per interval)."""
    if cfg.pd_mode != "adaptive" or now_s - state.last_change_s < cfg.pd_role_interval_s:
        return []
    live = [i for i in instances if i.alive and not i.draining]

    def configured(i: InstanceLoad) -> str:
        return state.configured.get(i.instance_id, i.role)

    prefill = [i for i in live if i.role == "prefill"]
    decode = [i for i in live if i.role == "decode"]
    lent_decode = [i for i in live if i.role == "mixed" and configured(i) == "decode"]
    lent_prefill = [i for i in live if i.role == "mixed" and configured(i) == "prefill"]
    feeders = prefill + lent_decode + lent_prefill
    backlog = sum(i.queued_prefill_tokens for i in feeders) / max(1, len(feeders))
    sinks = decode + lent_prefill
    room = sum(freeness(i, cfg=cfg) for i in sinks) / len(sinks) if sinks else float("-inf")
    high, low = cfg.pd_prefill_backlog_tokens, cfg.pd_prefill_backlog_tokens / 4

    def pick(cands: list[InstanceLoad], key) -> str:  # noqa: ANN001
        return min(sorted(cands, key=lambda i: i.instance_id), key=key).instance_id

    change: tuple[str, str] | None = None
    if backlog > high and len(decode) > 1 and room > cfg.pd_decode_room:
        change = (pick(decode, lambda i: -freeness(i, cfg=cfg)), "mixed")  # a decode instance takes prefills
    elif backlog < low and len(prefill) > 1 and room < cfg.pd_decode_room / 2:
        change = (pick(prefill, lambda i: i.queued_prefill_tokens), "mixed")  # a prefill instance keeps its decodes
    elif lent_decode and backlog < high / 2:
        change = (pick(lent_decode, lambda i: i.queued_prefill_tokens), "decode")
    elif lent_prefill and (backlog > high / 2 or room > cfg.pd_decode_room):
        change = (pick(lent_prefill, lambda i: -i.queued_prefill_tokens), "prefill")
    if change is None:
        return []
    state.last_change_s = now_s
    return [change]
