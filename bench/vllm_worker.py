"""vLLM side of `kvferry bench engine`, run in a subprocess: python -m bench.vllm_worker IN OUT.

IN is a JSON job: {model (HF folder), dtype, max_model_len, max_num_seqs, decode_tokens,
batches: [{batch_size, prompts}], prefill_prompts, repeat, retry_busy, busy_cores}. OUT receives {version, records: [{batch_size,
decode_tok_s, t_full_s, t_first_s, first_output}], prefill_tok_s}. Decode time of a batch is the
time of generating 1 + decode_tokens tokens minus the time of generating 1 token for the same
prompts (prefill and first sample), each the fastest of `repeat` runs (at least 2 for the 1-token
runs). `decode_tok_s_ts` is a cross-check from vLLM's per-request token timestamps (see
timestamp_rate). A measurement during which other processes used more than busy_cores cores is
redone, up to retry_busy times. Prefix caching is off so the repeated prompts are recomputed.
"""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def timestamp_rate(outs) -> float | None:
    """Decode tokens/s from vLLM's own token timestamps: the sum over requests of
    (tokens after the first) / (last token time - first token time)."""
    total = 0.0
    for o in outs:
        m = o.metrics
        if m is None or not getattr(m, "last_token_ts", 0) or m.num_generation_tokens < 2:
            return None
        span = m.last_token_ts - m.first_token_ts
        if span <= 0:
            return None
        total += (m.num_generation_tokens - 1) / span
    return total


def main() -> None:
    job = json.load(open(sys.argv[1]))
    from vllm import LLM, SamplingParams, __version__

    from bench.engine import CPUWatch  # stdlib-only at import time

    llm = LLM(model=job["model"], dtype=job["dtype"], enforce_eager=True, skip_tokenizer_init=True,
              max_model_len=job["max_model_len"], max_num_seqs=job["max_num_seqs"],
              enable_prefix_caching=False, seed=0, disable_log_stats=False)

    def timed(prompts, max_tokens):
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        return time.perf_counter() - t0, outs

    n = job["decode_tokens"]
    repeat = int(job.get("repeat", 1))
    timed(job["batches"][0]["prompts"][:2], 4)  # warm-up
    records = []
    for b in job["batches"]:
        prompts = b["prompts"]
        for _ in range(1 + max(0, int(job.get("retry_busy", 0)))):
            watch = CPUWatch()
            t_first = min(timed(prompts, 1)[0] for _ in range(max(2, repeat)))
            fulls = [timed(prompts, 1 + n) for _ in range(repeat)]
            t_full, outs = min(fulls, key=lambda x: x[0])
            busy = watch.others_cores()
            if (busy or 0) <= job.get("busy_cores", 0.1):
                break
        decode = t_full - t_first
        records.append({"batch_size": b["batch_size"], "decode_tok_s": len(prompts) * n / decode if decode > 0 else None,
                        "decode_tok_s_ts": timestamp_rate(outs),
                        "t_full_s": t_full, "t_first_s": t_first, "other_processes_cores": busy,
                        "first_output": list(outs[0].outputs[0].token_ids)})
    result = {"version": __version__, "records": records}
    if job.get("prefill_prompts"):
        pp = job["prefill_prompts"]
        for _ in range(1 + max(0, int(job.get("retry_busy", 0)))):
            watch = CPUWatch()
            t = min(timed(pp, 1)[0] for _ in range(max(2, repeat)))
            busy = watch.others_cores()
            if (busy or 0) <= job.get("busy_cores", 0.1):
                break
        result["prefill_tok_s"] = sum(len(p) for p in pp) / t
        result["prefill_other_processes_cores"] = busy
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
