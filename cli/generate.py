"""`kvferry generate`: run one prompt through an in-process engine (kvferry's or vLLM's) and stream the text."""

from __future__ import annotations

import argparse
import json
import sys

from cli.common import add_model_args, int_list, positive_int

REPLACEMENT = "\ufffd"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text for one prompt with an in-process engine",
                       description="Generate text for one prompt with an in-process engine; streams the text "
                                   "to stdout as it is generated (or prints one JSON object with --json).")
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="plain text prompt (tokenized as is)")
    src.add_argument("--chat", help="a user message; the model's chat template is applied")
    src.add_argument("--prompt-ids", type=int_list, help="prompt token ids, comma-separated: 1,2,3")
    p.add_argument("--max-tokens", type=positive_int, default=64, help="tokens to generate at most (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0: off (default)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    p.add_argument("--engine", choices=("torch", "vllm"), default="torch",
                   help="torch: kvferry's engine (default); vllm: vLLM's (`make install-vllm`), block size 32")
    p.add_argument("--kv-cache-mb", type=positive_int, default=256, help="KV cache size in MiB (default: 256)")
    p.add_argument("--json", action="store_true",
                   help='print one JSON object {"token_ids", "text", "finish_reason"} and nothing else')
    p.set_defaults(func=run)


class IncrementalDetokenizer:
    """Text of a growing token sequence, emitted as stable suffixes.

    Each push decodes the whole output so far and returns only the part not yet emitted. Text that
    ends in U+FFFD (an incomplete multi-byte character, split across tokens) is held back until a
    later token completes it, so a stream never shows a broken character. `flush` emits the rest.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        text = self._text()
        if text.endswith(REPLACEMENT):
            return ""
        return self._emit(text)

    def flush(self) -> str:
        return self._emit(self._text())

    def _emit(self, text: str) -> str:
        if text.startswith(self.emitted):
            new = text[len(self.emitted):]
        else:
            # A decoder changed text it had already produced (rare): emit from the first difference
            # that was not printed yet; what was printed cannot be taken back.
            common = 0
            for a, b in zip(text, self.emitted):
                if a != b:
                    break
                common += 1
            new = text[max(common, len(self.emitted)):]
        self.emitted = text
        return new


def prompt_ids(args: argparse.Namespace, tokenizer) -> list[int]:
    from engine.errors import InvalidRequestError

    if args.prompt_ids is not None:
        return list(args.prompt_ids)
    if tokenizer is None:
        raise InvalidRequestError("this model has no tokenizer; pass --prompt-ids")
    if args.chat is not None:
        return tokenizer.encode_chat([{"role": "user", "content": args.chat}])
    return tokenizer.encode(args.prompt)


def run(args: argparse.Namespace) -> int:
    from cli.common import build_engine
    from engine.errors import EngineError
    from engine.request import SamplingParams

    if args.engine == "vllm":
        from engine.vllm_backend.engine import VllmEngine, VllmEngineConfig

        engine = VllmEngine(VllmEngineConfig(model=args.model, dtype=args.dtype, kv_cache_bytes=args.kv_cache_mb << 20))
    else:
        engine = build_engine(args.model, args.dtype, args.device, kv_cache_bytes=args.kv_cache_mb << 20)
    tokenizer = engine.tokenizer
    ids = prompt_ids(args, tokenizer)
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    engine.add_request("generate-0", ids, sampling)

    stream = None if args.json or tokenizer is None else IncrementalDetokenizer(tokenizer)
    out = sys.stdout
    token_ids: list[int] = []
    finish_reason = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.error:
                raise EngineError(o.error)
            token_ids.extend(o.new_token_ids)
            if stream is not None and o.new_token_ids:
                piece = stream.push(o.new_token_ids)
                if piece:
                    out.write(piece)
                    out.flush()
            if o.finished:
                finish_reason = o.finish_reason.value if o.finish_reason else None

    if args.json:
        text = tokenizer.decode(token_ids) if tokenizer is not None else ""
        out.write(json.dumps({"token_ids": token_ids, "text": text, "finish_reason": finish_reason},
                             ensure_ascii=False) + "\n")
    elif stream is not None:
        out.write(stream.flush() + "\n")
    else:  # no tokenizer: the ids are all there is to show
        out.write(" ".join(map(str, token_ids)) + "\n")
    out.flush()
    return 0
