"""Resumption (design §6): a request whose owner failed it goes on elsewhere by recompute.

The new prompt is the original prompt + every token this frontend already delivered, with
`first_index` = how many and the lost owners excluded, so the client's stream goes on without a
seam. Triggers: the owner is lost (pings, or the scheduler's view), the owner's final
"error"/"abort" batch, a gap that stays open for [frontend] gap_timeout_s (a dropped batch), and
a silent request that no live worker lists in the scheduler's view — on the word of a report its
owner made after the request went missing, so a worker stuck in a long step does not lose the
requests it has not reported yet. At most [frontend] max_resumes per request; when no worker can
take it the stream ends with an error, never a hang.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import msgspec

from protocol.common import ErrorCode
from protocol.payloads import SamplingParams
from protocol.to_frontend import StatusReply
from services.config import FrontendConfig
from services.frontend.errors import RouteError
from services.frontend.streams import RequestStream
from services.log import get_logger

log = get_logger("kvferry.frontend.router")

# (stream, prompt, sampling, first_index, exclude) → the request runs on a new owner (Router._start)
StartFn = Callable[[RequestStream, list[int], SamplingParams, int, set[str]], Awaitable[None]]
SendAbortFn = Callable[..., Coroutine[Any, Any, None]]


class Resumer:
    """Takes requests away from owners that failed them (see the module docstring).

    Collaborators: the router's live streams (by request id), how to start a request on a new
    owner, how to abort it at an old one, where background tasks go, and a per-outcome callback
    ("resumed" / "failed", the frontend's metrics)."""

    def __init__(self, fcfg: FrontendConfig, streams: dict[str, RequestStream], start: StartFn,
                 send_abort: SendAbortFn, spawn: Callable[[Coroutine[Any, Any, None]], None],
                 on_resume: Callable[[str], None] | None = None) -> None:
        self.fcfg = fcfg
        self.streams = streams
        self._start = start
        self._send_abort = send_abort
        self._spawn = spawn
        self.on_resume = on_resume
        # silent request id → (since when no live worker lists it, its owner's report time then)
        self._unlisted: dict[str, tuple[float, int]] = {}

    def resume(self, stream: RequestStream, why: str, owner_let_go: bool = False) -> bool:
        """Take `stream`'s request away from its owner and go on elsewhere (in the background).
        False when the stream is not live (it then ends as it would have)."""
        if stream.resuming:
            return True
        if self.streams.get(stream.request_id) is not stream or stream.finished:
            return False
        old_id, old_address = stream.worker_id, stream.worker_address
        stream.begin_resume()
        self._unlisted.pop(stream.request_id, None)
        if not owner_let_go and old_address:
            # A false alarm (the worker lives on) must not leave a copy running there.
            self._spawn(self._send_abort(stream.request_id, old_address, "resumed on another worker", quiet=True))
        self._spawn(self._resume(stream, old_id, why))
        return True

    def owner_let_go(self, stream: RequestStream, why: str) -> bool:
        """A final "error"/"abort" batch from the request's owner (RequestStream.on_lost)."""
        return self.resume(stream, why, owner_let_go=True)

    def resume_all(self, worker_id: str, address: str, why: str, silent_since: float | None = None) -> int:
        """Resume every request of a lost worker; how many. With `silent_since` (the worker has
        not answered this frontend since then), requests handed to it later are left alone: the
        scheduler that sent them there had heard from it since (a worker restarted under the same
        id and address, whose old incarnation's silence is what the pings measured). If that new
        owner is lost too, its pings, the scheduler's view or the silent-request check say so."""
        affected = [s for s in self.streams.values()
                    if (s.worker_address == address or s.worker_id == worker_id) and not s.resuming
                    and (silent_since is None or s.assigned_at <= silent_since)]
        for s in affected:
            self.resume(s, f"{worker_id} lost: {why}")
        return len(affected)

    async def _resume(self, stream: RequestStream, old_id: str, why: str) -> None:
        rid = stream.request_id
        assert stream.sampling is not None
        delivered = stream.next_index
        left = stream.sampling.max_tokens - delivered
        try:
            if left <= 0:  # every token arrived; only the final batch was lost
                stream.end("length")
                return
            if not stream.count_resume(self.fcfg.max_resumes):
                raise RouteError(ErrorCode.UNAVAILABLE, f"resumed {stream.resumes} times already (max_resumes)")
            # The delivered tokens end the new prompt; the penalties and min_tokens still count them
            # as output, and the prompt's logprobs (if asked) came with the first of them.
            sampling = msgspec.structs.replace(
                stream.sampling, max_tokens=left, prior_output_tokens=stream.sampling.prior_output_tokens + delivered,
                prompt_logprobs=stream.sampling.prompt_logprobs if not delivered else None)
            await self._start(stream, stream.prompt_ids + stream.output, sampling, delivered, set(stream.dead))
        except RouteError as exc:
            log.warning("request.resume_failed", request_id=rid, lost_worker_id=old_id, reason=why, error=exc.message)
            stream.fail("error", f"{old_id} failed the request ({why}) and no worker could resume it: {exc.message}")
            if self.on_resume is not None:
                self.on_resume("failed")
            return
        except Exception as exc:  # noqa: BLE001 - the stream must end, not hang
            log.exception("request.resume_failed", request_id=rid)
            stream.fail("error", f"{old_id} failed the request ({why}); resuming it failed: {exc}")
            return
        finally:
            stream.end_resume()
        if self.streams.get(rid) is stream:
            log.warning("request.resumed", request_id=rid, lost_worker_id=old_id, worker_id=stream.worker_id,
                        reason=why, first_index=delivered, resumes=stream.resumes)
            if self.on_resume is not None:
                self.on_resume("resumed")

    def check_gaps(self, now: float) -> None:
        """Resume streams stuck behind a gap for longer than [frontend] gap_timeout_s."""
        for s in list(self.streams.values()):
            if s.ahead and not s.resuming and now - s.progressed > self.fcfg.gap_timeout_s:
                self.resume(s, f"tokens from index {s.next_index} never arrived")

    def silent(self, now: float) -> list[RequestStream]:
        """Streams with no new token for [frontend] silent_s (to look up in the scheduler's view)."""
        found = [s for s in self.streams.values() if not s.resuming and now - s.progressed > self.fcfg.silent_s]
        if not found:
            self._unlisted.clear()
        return found

    def check_silent(self, silent: list[RequestStream], reply: StatusReply, now: float) -> None:
        """Resume the `silent` streams that no live worker has listed for [frontend] unlisted_s in
        `reply` (the scheduler's view with requests)."""
        listed = {r.request_id for r in reply.requests}
        # Only an owner that reports (alive, registered with this scheduler) can vouch that it does
        # not hold the request; an unlisted owner is the pings' business.
        # And only a report made after we first missed the request counts: a worker stuck in a
        # long step (or paused) reports nothing, and its last report may predate the request.
        reporting = {i.worker_id: i.last_report_ms for i in reply.instances if i.alive and i.last_report_ms > 0}
        unlisted: dict[str, tuple[float, int]] = {}
        for s in silent:
            if s.request_id in listed or s.worker_id not in reporting:
                continue
            since, report_ms = self._unlisted.get(s.request_id, (now, reporting[s.worker_id]))
            if (now - since >= self.fcfg.unlisted_s and reporting[s.worker_id] > report_ms
                    and self.streams.get(s.request_id) is s):
                self.resume(s, "listed on no live worker")
            else:
                unlisted[s.request_id] = (since, report_ms)
        self._unlisted = unlisted
