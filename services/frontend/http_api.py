"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions, responses (the text subset:
services/frontend/responses_api.py), models (and one model by id), vLLM's /tokenize, /detokenize and
/version, health, metrics.

Every error is an OpenAI error body. A streaming response is SSE (`data: {...}\\n\\n` chunks, then
`data: [DONE]`); with `stream_options.include_usage` a last chunk has empty `choices` and the
`usage`. A client that disconnects has its request aborted on the worker that owns it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from msgspec.json import encode as _json_encode
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.config import FrontendConfig
from services.frontend.choices import ChoiceRenderer, TokenTexts
from services.frontend.generation import Delta, GenerateParams, GenerationError, Generator, Usage, join_deltas
from services.frontend.metrics import FrontendMetrics
from services.frontend.params import ApiError, ParsedRequest, RequestParser, api_key_matches, bad
from services.frontend.errors import RouteError
from services.frontend.responses_api import ResponseBuilder, renamed, to_chat_body
from services.frontend.router import Router, new_request_id
from services.log import get_logger

log = get_logger("kvferry.frontend.http")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("kvferry")
    except PackageNotFoundError:  # run from a source tree without an install
        return "0+unknown"


KVFERRY_VERSION = _version()

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ApiContext:
    """What the HTTP handlers need."""

    cfg: FrontendConfig
    model_name: str
    parser: RequestParser
    generator: Generator
    router: Router
    metrics: FrontendMetrics
    created: int = 0


def _dumps(obj: Any) -> str:
    # msgspec's JSON encoder is several times faster than json.dumps on the per-event SSE path.
    return _json_encode(obj).decode()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the request body was already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(ctx: ApiContext) -> FastAPI:
    """The FastAPI app over a running Router/Generator."""
    app = FastAPI(title="kvferry", docs_url=None, redoc_url=None, openapi_url=None)
    ctx.created = ctx.created or int(time.time())
    texts = TokenTexts(ctx.parser.tokenizer)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(bad(str(exc)).body(), status_code=400)

    def auth(request: Request) -> None:
        key = ctx.cfg.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not api_key_matches(token.strip(), key):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer ...)", code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        limit = ctx.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad(f"the request body is not valid JSON: {exc}", None, "invalid_json") from None
        except RecursionError:  # e.g. "[[[[..." within the body limit: refuse, do not crash the handler
            raise bad("the request body is nested too deeply", None, "invalid_json") from None

    async def parse(request: Request, chat: bool) -> ParsedRequest:
        auth(request)
        body = await read_json(request)
        try:
            return ctx.parser.chat(body) if chat else ctx.parser.completion(body)
        except ApiError:
            ctx.metrics.requests.labels(outcome="invalid").inc()
            raise

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, await parse(request, chat=False), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, await parse(request, chat=True), chat=True)

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        auth(request)
        body = await read_json(request)
        try:
            ctx.parser.check_model(body)
            parsed = ctx.parser.chat(to_chat_body(body))
        except ApiError as exc:
            ctx.metrics.requests.labels(outcome="invalid").inc()
            raise renamed(exc) from None
        if parsed.n > 1:
            raise bad("'n' is not part of the Responses API", "n", "unsupported_parameter")
        if ctx.generator.active >= ctx.cfg.max_inflight:
            ctx.metrics.requests.labels(outcome="rejected").inc()
            raise ApiError(429, f"more than {ctx.cfg.max_inflight} requests in flight; retry later",
                           code="too_many_requests", headers={"Retry-After": "1"})
        builder = ResponseBuilder(ctx.model_name, body)
        params = GenerateParams(builder.id, parsed.prompt_ids, parsed.sampling, parsed.stop, parsed.priority,
                                ctx.cfg.request_timeout_s, parsed.cache_salt, parsed.include_stop_str)
        deltas = ctx.generator.run(params)
        first = await _start(request, deltas, builder.id)
        if parsed.stream:
            return StreamingResponse(_response_events(first, deltas, builder), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        try:
            out = first if first.finish_reason else await _watch_disconnect(request, _rest(first, deltas), builder.id)
        except GenerationError as exc:
            raise ApiError(exc.status, exc.message, code=exc.code) from None
        finally:
            await deltas.aclose()
        status, why = ("incomplete", "max_output_tokens") if out.finish_reason == "length" else ("completed", None)
        return JSONResponse(builder.response(status, out.text, out.usage, why))

    async def _response_events(first: Delta, deltas: AsyncIterator[Delta], b: ResponseBuilder) -> AsyncIterator[str]:
        def sse(ev: dict[str, Any]) -> str:
            return f"event: {ev['type']}\ndata: {_dumps(ev)}\n\n"

        text: list[str] = []
        try:
            for ev in b.opening():
                yield sse(ev)
            d: Delta | None = first
            while d is not None:
                if d.text:
                    text.append(d.text)
                    yield sse(b.delta(d.text))
                if d.finish_reason:
                    for ev in b.closing("".join(text), d.finish_reason, d.usage):
                        yield sse(ev)
                    return
                d = await deltas.__anext__()
        except GenerationError as exc:
            yield sse(b.event("error", code=exc.code, message=exc.message, param=None))
        except StopAsyncIteration:
            pass
        finally:
            await deltas.aclose()

    def model_card() -> dict[str, Any]:
        card = {"id": ctx.model_name, "object": "model", "created": ctx.created, "owned_by": "kvferry",
                "root": ctx.model_name, "parent": None}
        if ctx.parser.max_context is not None:
            card["max_model_len"] = ctx.parser.max_context
        return card

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        auth(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> JSONResponse:
        auth(request)
        if model_id not in ctx.parser.model_names:
            raise ctx.parser.unknown_model(model_id)
        return JSONResponse(model_card())

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        auth(request)
        return JSONResponse(ctx.parser.tokenize(await read_json(request)))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        auth(request)
        return JSONResponse(ctx.parser.detokenize(await read_json(request)))

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": KVFERRY_VERSION})

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = ctx.router.healthy
        body = {"status": "ok" if ok else "unavailable", "workers": len(ctx.router.known),
                "scheduler": {True: "ok", False: "unreachable", None: "unknown"}[ctx.router.scheduler_ok]}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # ---- generation ------------------------------------------------------------------------------

    async def generate(request: Request, parsed: ParsedRequest, chat: bool) -> Response:
        if ctx.generator.active >= ctx.cfg.max_inflight:
            ctx.metrics.requests.labels(outcome="rejected").inc()
            raise ApiError(429, f"more than {ctx.cfg.max_inflight} requests in flight; retry later",
                           code="too_many_requests", headers={"Retry-After": "1"})
        rid = new_request_id("chatcmpl" if chat else "cmpl")
        if parsed.samples_per_prompt > 1 or len(parsed.prompts) > 1:
            return await _many(request, parsed, rid, chat)
        params = GenerateParams(rid, parsed.prompt_ids, parsed.sampling, parsed.stop, parsed.priority,
                                ctx.cfg.request_timeout_s, parsed.cache_salt, parsed.include_stop_str)
        renderer = ChoiceRenderer(texts, parsed, chat, 0)
        deltas = ctx.generator.run(params)
        first = await _start(request, deltas, rid)
        if parsed.stream:
            return StreamingResponse(_sse(first, deltas, rid, chat, parsed, renderer), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        return await _whole(request, first, deltas, rid, chat, parsed, renderer)

    # ---- several choices (n > 1, a batch of prompts): one engine request each ------------------------

    async def _many(request: Request, parsed: ParsedRequest, rid: str, chat: bool) -> Response:
        """Start every choice's request (`{rid}-{index}`), each routed, migrated and resumed on its own;
        a choice that cannot start fails the whole request (the others are aborted)."""
        subs = [GenerateParams(f"{rid}-{k}", ids, sp, parsed.stop, parsed.priority, ctx.cfg.request_timeout_s,
                               parsed.cache_salt, parsed.include_stop_str) for k, (ids, sp) in enumerate(parsed.choices())]
        per = parsed.samples_per_prompt
        if ctx.generator.active + len(subs) > ctx.cfg.max_inflight:
            ctx.metrics.requests.labels(outcome="rejected").inc()
            raise ApiError(429, f"{len(subs)} choices would put more than {ctx.cfg.max_inflight} requests in flight; "
                                "retry later", code="too_many_requests", headers={"Retry-After": "1"})
        gens = [ctx.generator.run(p) for p in subs]
        ids = [p.request_id for p in subs]
        try:
            # return_exceptions: every start has settled before any generator is closed
            firsts = await _watch_disconnect(
                request, asyncio.gather(*(g.__anext__() for g in gens), return_exceptions=True), *ids)
        except BaseException:
            await _close_all(gens)
            raise
        failed = next((f for f in firsts if isinstance(f, BaseException)), None)
        if failed is not None:
            await _close_all(gens)
            if isinstance(failed, (RouteError, GenerationError)):
                headers = {"Retry-After": "1"} if failed.status in (429, 503) else None
                raise ApiError(failed.status, failed.message, code=failed.code, headers=headers) from None
            raise failed
        prompt_tokens = sum(len(p) for p in parsed.prompts or [parsed.prompt_ids])
        if parsed.stream:  # (best_of > n is not streamed: samples are choices here)
            renderers = [ChoiceRenderer(texts, parsed, chat, k, k // per) for k in range(len(gens))]
            return StreamingResponse(_sse_many(firsts, gens, rid, chat, parsed, renderers, prompt_tokens),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            outs = await _watch_disconnect(
                request, asyncio.gather(*(_rest(f, g) for f, g in zip(firsts, gens)), return_exceptions=True), *ids)
        finally:
            await _close_all(gens)
        failed = next((o for o in outs if isinstance(o, BaseException)), None)
        if isinstance(failed, GenerationError):
            raise ApiError(failed.status, failed.message, code=failed.code)
        if failed is not None:
            raise failed
        choices = []
        for i in range(0, len(outs), per):  # per prompt: its n samples, or the n most likely of best_of
            group = outs[i:i + per]
            if per > parsed.n:
                group = sorted(group, key=lambda o: -sum(lp.logprob for lp in o.logprobs or ()))[:parsed.n]
            for o in group:
                k = len(choices)
                choices.append(ChoiceRenderer(texts, parsed, chat, k, i // per).whole(o))
        done = 0 if parsed.no_output else sum(o.usage.completion_tokens for o in outs if o.usage)
        return JSONResponse(_answer(rid, chat, choices, Usage(prompt_tokens, done).to_dict()))

    def _answer(rid: str, chat: bool, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> dict[str, Any]:
        body: dict[str, Any] = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                                "created": int(time.time()), "model": ctx.model_name, "choices": choices,
                                "usage": usage}
        if chat and choices and "prompt_logprobs" in choices[0]:  # vLLM's chat answer has them at the top
            body["prompt_logprobs"] = choices[0].pop("prompt_logprobs")
            for c in choices[1:]:
                c.pop("prompt_logprobs", None)
        return body

    async def _rest(first: Delta, deltas: AsyncIterator[Delta]) -> Delta:
        return await join_deltas(deltas, first)

    async def _close_all(gens: list[AsyncIterator[Delta]]) -> None:
        for g in gens:
            with contextlib.suppress(BaseException):
                await g.aclose()  # type: ignore[attr-defined]

    def _chunk(rid: str, obj: str, created: int, include_usage: bool, renderer: ChoiceRenderer, d: Delta | None,
               role: bool = False) -> str:
        """One SSE event carrying the renderer's choice's delta `d` (`role`: chat's opening role event)."""
        body: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": ctx.model_name,
                                "choices": [renderer.chunk(d, role)]}
        if renderer.parsed.continuous_usage:  # vLLM's: the usage so far in every chunk
            done = 0 if d is None or renderer.parsed.no_output else d.first_index + len(d.token_ids)
            body["usage"] = Usage(renderer.prompt_tokens, done).to_dict()
        elif include_usage:
            body["usage"] = None
        return f"data: {_dumps(body)}\n\n"

    async def _sse_many(firsts: list[Delta], gens: list[AsyncIterator[Delta]], rid: str, chat: bool,
                        parsed: ParsedRequest, renderers: list[ChoiceRenderer], prompt_tokens: int) -> AsyncIterator[str]:
        """The choices' chunks as they come, each with its index; one usage chunk for all at the end."""
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        queue: asyncio.Queue[tuple[int, Delta | BaseException | None]] = asyncio.Queue()

        async def pump(k: int, first: Delta, g: AsyncIterator[Delta]) -> None:
            try:
                await queue.put((k, first))
                if not first.finish_reason:
                    async for d in g:
                        await queue.put((k, d))
                await queue.put((k, None))
            except GenerationError as exc:
                await queue.put((k, exc))
            except Exception as exc:  # noqa: BLE001 - one choice's failure ends that choice, not the stream
                await queue.put((k, GenerationError("error", f"{type(exc).__name__}: {exc}")))

        include_usage = parsed.include_usage

        def chunk(k: int, d: Delta | None, role: bool = False) -> str:
            return _chunk(rid, obj, created, include_usage, renderers[k], d, role)

        tasks = [asyncio.ensure_future(pump(k, f, g)) for k, (f, g) in enumerate(zip(firsts, gens))]
        completion = 0
        try:
            if chat:
                for k in range(len(gens)):
                    yield chunk(k, None, role=True)
            left = len(gens)
            while left:
                k, item = await queue.get()
                if item is None:
                    left -= 1
                elif isinstance(item, GenerationError):
                    yield f"data: {_dumps(ApiError(item.status, item.message, code=item.code).body())}\n\n"
                    left -= 1
                else:
                    if item.text or item.finish_reason or renderers[k].wants(item):
                        yield chunk(k, item)
                    if item.usage is not None and not parsed.no_output:
                        completion += item.usage.completion_tokens
        finally:
            for t in tasks:
                t.cancel()
            await _close_all(gens)
        if include_usage:
            body = {"id": rid, "object": obj, "created": created, "model": ctx.model_name, "choices": [],
                    "usage": Usage(prompt_tokens, completion).to_dict()}
            yield f"data: {_dumps(body)}\n\n"
        yield "data: [DONE]\n\n"

    async def _start(request: Request, deltas: AsyncIterator[Delta], rid: str) -> Delta:
        """The first delta; a request that cannot start or fails first is an OpenAI error."""
        try:
            return await _watch_disconnect(request, deltas.__anext__(), rid)
        except RouteError as exc:
            await deltas.aclose()  # type: ignore[attr-defined]
            raise ApiError(exc.status, exc.message, code=exc.code,
                           headers={"Retry-After": "1"} if exc.status in (429, 503) else None) from None
        except GenerationError as exc:
            await deltas.aclose()  # type: ignore[attr-defined]
            raise ApiError(exc.status, exc.message, code=exc.code) from None
        except BaseException:
            await deltas.aclose()  # type: ignore[attr-defined]
            raise

    async def _watch_disconnect(request: Request, awaitable: Any, *rids: str) -> Any:
        """Await `awaitable`; abort the requests `rids` (a request's choices) if the client
        disconnects first."""
        task = asyncio.ensure_future(awaitable)
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            log.info("request.client_disconnected", request_id=rids[0], choices=len(rids))
            for r in rids:
                ctx.router.abort(r, "client disconnected")
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise ApiError(499, "client disconnected")
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()

    async def _whole(request: Request, first: Delta, deltas: AsyncIterator[Delta], rid: str, chat: bool,
                     parsed: ParsedRequest, renderer: ChoiceRenderer) -> Response:
        try:
            out = first if first.finish_reason else await _watch_disconnect(request, _rest(first, deltas), rid)
        except GenerationError as exc:
            raise ApiError(exc.status, exc.message, code=exc.code) from None
        finally:
            await deltas.aclose()
        usage = _usage(out.usage, parsed)
        return JSONResponse(_answer(rid, chat, [renderer.whole(out)], usage.to_dict() if usage else None))

    def _usage(usage: Usage | None, parsed: ParsedRequest) -> Usage | None:
        if usage is not None and parsed.no_output:  # the one token generated for max_tokens 0 is not answered
            return Usage(usage.prompt_tokens, 0)
        return usage

    async def _sse(first: Delta, deltas: AsyncIterator[Delta], rid: str, chat: bool,
                   parsed: ParsedRequest, renderer: ChoiceRenderer) -> AsyncIterator[str]:
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        include_usage = parsed.include_usage

        def chunk(d: Delta | None, role: bool = False) -> str:
            return _chunk(rid, obj, created, include_usage, renderer, d, role)

        last: Delta | None = None
        try:
            if chat:
                yield chunk(None, role=True)
            d: Delta | None = first
            while d is not None:
                if d.text or d.finish_reason or renderer.wants(d):
                    yield chunk(d)
                last = d
                d = None if d.finish_reason else await deltas.__anext__()
        except GenerationError as exc:
            yield f"data: {_dumps(ApiError(exc.status, exc.message, code=exc.code).body())}\n\n"
        except StopAsyncIteration:
            pass
        finally:
            await deltas.aclose()
        if include_usage and last is not None and last.usage is not None:
            body = {"id": rid, "object": obj, "created": created, "model": ctx.model_name, "choices": [],
                    "usage": _usage(last.usage, parsed).to_dict()}
            yield f"data: {_dumps(body)}\n\n"
        yield "data: [DONE]\n\n"

    return app
