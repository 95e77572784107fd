"""`kvferry bench engine`: throughput of the real engine (LLMEngine.step loop), optionally vs vLLM.

Decode: for each batch size B, B prompts of --prompt-len random token ids (ignore_eos) are all
prefilled first; then only the next --decode-tokens steps (each a pure decode step of B requests)
are timed: decode_tok_s = B * decode_tokens / their total time, step_ms = their mean.
Prefill: --prefill-prompts prompts of --prefill-len tokens (8 x 256 by default, one 2048-token
step) timed until each has sampled its first token; prefill_tok_s = prompt tokens / that time.
vLLM (when `import vllm` works in this Python): the same prompts through vLLM's CPU build in a
subprocess (bench/vllm_worker.py); its decode time is t(1 + N tokens) - t(1 token).
--fit: a few more context lengths and prefill sizes, then a least-squares fit of the sim's
LatencyModel to every timed step, printed as a Python literal.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path


BUSY_CORES = 0.1  # other processes' average CPU use above which a measurement counts as disturbed
FIT_PARAMS = ("base_ms", "per_seq_ms", "per_prefill_token_ms", "per_context_token_ms")


@dataclass
class Options:
    """`kvferry bench engine`'s settings (the flags, same names; their defaults are the CLI's)."""

    model: str
    dtype: str
    device: str
    json: str | None
    batch_sizes: list[int]
    decode_tokens: int
    prompt_len: int
    prefill_prompts: int
    prefill_len: int
    repeat: int
    retry_busy: int
    fit: bool
    no_vllm: bool
    seed: int
    threads: int | None


@dataclass
class Step:
    """One timed engine step: what the scheduler put in it (as the sim's latency model counts) and how long."""

    phase: str
    batch_size: int
    prefill_tokens: int
    context_tokens: int
    ms: float


class StepRecorder:
    """Wraps the engine's executor to learn what each step ran; times whole `engine.step()` calls."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self._execute = engine.executor.execute
        engine.executor.execute = self._record
        self.last: tuple[int, int, int] | None = None
        self.steps: list[Step] = []

    def _record(self, sched, table):
        prefill = sum(s.num_new_tokens for s in sched.scheduled if s.num_new_tokens > 1)
        context = sum(s.start + s.num_new_tokens for s in sched.scheduled)
        self.last = (len(sched.scheduled), prefill, context)
        return self._execute(sched, table)

    def step(self, phase: str) -> Step | None:
        self.last = None
        t0 = time.perf_counter()
        self.engine.step()
        ms = (time.perf_counter() - t0) * 1000.0
        if self.last is None:
            return None
        s = Step(phase, *self.last, ms)
        self.steps.append(s)
        return s


def random_prompts(rng: random.Random, n: int, length: int, vocab: int) -> list[list[int]]:
    lo = 0 if vocab < 1000 else 100  # stay clear of control tokens at the start of large vocabularies
    return [[rng.randrange(lo, vocab) for _ in range(length)] for _ in range(n)]


def _sampling(max_tokens: int):
    from engine.request import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def measure_decode(rec: StepRecorder, prompts: list[list[int]], decode_tokens: int, phase: str) -> dict:
    """Prefill all prompts, then time exactly `decode_tokens` decode steps of the whole batch.

    Long batches are prefilled in chunks, and requests prefilled early decode meanwhile, so each
    request may generate more than `decode_tokens`; they are aborted after the timed steps."""
    engine = rec.engine
    tag = f"{phase}-{len(rec.steps)}"
    extra = prefill_slack(len(prompts) * len(prompts[0]), engine.config.max_num_batched_tokens)
    watch = CPUWatch()
    reqs = [engine.add_request(f"{tag}-{i}", p, _sampling(decode_tokens + 1 + extra)) for i, p in enumerate(prompts)]
    while any(r.num_output_tokens == 0 for r in reqs):
        rec.step(f"{phase}-prefill")
    steps = [rec.step(f"{phase}-decode") for _ in range(decode_tokens)]
    for r in reqs:
        engine.abort_request(r.request_id)
    b = len(prompts)
    if any(s is None or s.batch_size != b or s.prefill_tokens for s in steps):
        raise RuntimeError(f"decode of batch {b} did not run as {decode_tokens} steps of {b} decodes")
    total_s = sum(s.ms for s in steps) / 1000.0
    return {"batch_size": b, "decode_tok_s": b * decode_tokens / total_s, "step_ms": total_s * 1000.0 / len(steps),
            "step_ms_median": statistics.median(s.ms for s in steps),
            "context_tokens": len(prompts[0]), "other_processes_cores": watch.others_cores(),
            "output": list(reqs[0].output_token_ids)}


def prefill_slack(prompt_tokens: int, budget: int) -> int:
    """Tokens a request may generate while the rest of its batch is still being prefilled."""
    return -(-prompt_tokens // budget) + 1


def measure_prefill(rec: StepRecorder, prompts: list[list[int]], phase: str) -> dict:
    """Time the steps until every prompt has sampled its first token."""
    engine = rec.engine
    tag = f"{phase}-{len(rec.steps)}"
    reqs = [engine.add_request(f"{tag}-{i}", p, _sampling(1)) for i, p in enumerate(prompts)]
    ms = 0.0
    nsteps = 0
    while engine.has_unfinished_requests():
        s = rec.step(phase)
        if s is not None:
            ms += s.ms
            nsteps += 1
    assert all(r.is_finished for r in reqs)
    tokens = sum(len(p) for p in prompts)
    return {"num_prompts": len(prompts), "prompt_len": len(prompts[0]), "tokens": tokens, "steps": nsteps,
            "ms": ms, "tok_s": tokens / (ms / 1000.0)}


def machine_info() -> dict:
    import torch

    cpu_model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_count": os.cpu_count(), "cpu_model": cpu_model, "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
            "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "KMP_"))}}


class CPUWatch:
    """CPU time other processes used during a stretch: all busy time in /proc/stat minus ours
    (and our children's). Spin-waiting torch threads make even light competition costly, so the
    bench reports it next to its figures."""

    def __init__(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()

    @staticmethod
    def _busy() -> float | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
        return busy / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def others_cores(self) -> float | None:
        """Average number of cores busy with other processes since construction."""
        busy = self._busy()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        return max(0.0, (busy - self.busy0) - (self._own() - self.own0)) / max(wall, 1e-9)


# ---- least-squares fit of the latency model ------------------------------------------------

def fit_latency(steps: list[Step]) -> dict:
    """Non-negative least squares on relative error: each step weighs 1/ms, so the 10 ms decode
    steps count as much as the second-long prefills. Steps far off the first fit (another process
    took the CPU) are dropped and the fit is redone. Returns the four parameters and the error."""
    import numpy as np

    a = np.array([[1.0, s.batch_size, s.prefill_tokens, s.context_tokens] for s in steps])
    y = np.array([s.ms for s in steps])
    keep = np.ones(len(y), dtype=bool)
    for _ in range(3):
        x = _nnls_rel(a[keep], y[keep])
        rel = np.abs(a @ x - y) / y
        new_keep = rel <= max(0.25, 3.0 * float(np.median(rel)))
        if new_keep.sum() < 4 or (new_keep == keep).all():
            break
        keep = new_keep
    rel = np.abs(a @ x - y) / y
    params = {name: float(v) for name, v in zip(FIT_PARAMS, x)}
    return {"params": params, "num_steps": int(keep.sum()), "num_dropped": int((~keep).sum()),
            "median_rel_error": float(np.median(rel[keep])), "max_rel_error": float(rel[keep].max())}


def _nnls_rel(a, y):
    """Exact NNLS for 4 unknowns: the best unconstrained fit over supports that stays >= 0."""
    import numpy as np

    aw, yw = a / y[:, None], np.ones_like(y)
    best = None
    for k in range(1, a.shape[1] + 1):
        for support in combinations(range(a.shape[1]), k):
            sol, *_ = np.linalg.lstsq(aw[:, support], yw, rcond=None)
            if (sol < 0).any():
                continue
            x = np.zeros(a.shape[1])
            x[list(support)] = sol
            err = float(np.sum((aw @ x - yw) ** 2))
            if best is None or err < best[0]:
                best = (err, x)
    return best[1]


def _round(v: float) -> float:
    return float(f"{v:.3g}") if v else 0.0


def latency_literal(name: str, params: dict, kv_capacity_tokens: int, kv_bytes_per_token: int, vocab: int) -> str:
    p = {k: _round(v) for k, v in params.items()}
    return (f'LatencyModel(\n    name="{name}", base_ms={p["base_ms"]}, per_seq_ms={p["per_seq_ms"]}, '
            f'per_prefill_token_ms={p["per_prefill_token_ms"]},\n    per_context_token_ms={p["per_context_token_ms"]}, '
            f"kv_capacity_tokens={kv_capacity_tokens}, kv_bytes_per_token={kv_bytes_per_token}, "
            f"vocab_size={vocab},\n)")


# ---- vLLM --------------------------------------------------------------------------------

def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def run_vllm(model: str, dtype: str, batches: list[dict], prefill_prompts: list[list[int]], decode_tokens: int,
             max_model_len: int, repeat: int = 1, retry_busy: int = 0, seed: int = 0) -> dict:
    """Run bench/vllm_worker.py in a subprocess; returns its result or {"error": ...}."""
    from engine.weights.hf_export import cache_dir, hf_folder_for

    folder = hf_folder_for(model, seed=seed)
    job = {"model": str(folder), "dtype": dtype, "max_model_len": max_model_len,
           "max_num_seqs": max(len(b["prompts"]) for b in batches + [{"prompts": prefill_prompts}]),
           "decode_tokens": decode_tokens, "batches": batches, "prefill_prompts": prefill_prompts,
           "repeat": repeat, "retry_busy": retry_busy, "busy_cores": BUSY_CORES}
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="2")
    cache_dir().mkdir(parents=True, exist_ok=True)
    log_path = cache_dir() / "vllm-bench.log"
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        # As a module, not a script: a script's folder (bench/) goes first on sys.path, where
        # bench/engine.py would shadow the engine package. The repository root makes it importable.
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        with open(log_path, "w") as log:
            proc = subprocess.run([sys.executable, "-m", "bench.vllm_worker", str(job_path), str(out_path)], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if proc.returncode != 0 or not out_path.is_file():
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            return {"error": f"vLLM run failed (exit {proc.returncode}, log {log_path}): " + " | ".join(tail)}
        result = json.loads(out_path.read_text())
    result["hf_folder"] = str(folder)
    result["log"] = str(log_path)
    return result


# ---- the command -------------------------------------------------------------------------

def run(opts: Options) -> int:
    import torch

    from bench import UsageError
    from engine.block_manager import blocks_for
    from engine.config import EngineConfig
    from engine.engine import LLMEngine

    if min(opts.batch_sizes) < 1:
        raise UsageError("--batch-sizes must be positive")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    rng = random.Random(opts.seed)
    max_bs = max(opts.batch_sizes)
    n = opts.decode_tokens
    # Context sweeps for --fit: decode at 8 sequences over a few prompt lengths, and prefill sizes.
    fit_ctx = [64, 512, 1536] if opts.fit else []
    fit_prefills = [(1, 32), (1, 128), (1, 512), (4, 128), (2, 1024)] if opts.fit else []

    block = EngineConfig().block_size
    budget = max(2048, opts.prefill_prompts * opts.prefill_len)
    live = [b * blocks_for(opts.prompt_len + n + 2 + prefill_slack(b * opts.prompt_len, budget), block)
            for b in opts.batch_sizes]
    live.append(opts.prefill_prompts * blocks_for(opts.prefill_len + 2, block))
    live += [8 * blocks_for(c + 16 + 2 + prefill_slack(8 * c, budget), block) for c in fit_ctx]
    live += [k * blocks_for(m + 2, block) for k, m in fit_prefills]
    num_blocks = int(max(live) * 1.05) + 8
    max_len_needed = max([opts.prompt_len + n + 2 + prefill_slack(max_bs * opts.prompt_len, budget),
                          opts.prefill_len + 2] + [c + 18 + prefill_slack(8 * c, budget) for c in fit_ctx]
                         + [m + 2 for _, m in fit_prefills])
    engine = LLMEngine.from_model(opts.model, EngineConfig(dtype=opts.dtype, device=opts.device, num_blocks=num_blocks,
                                                           max_num_seqs=max(max_bs, opts.prefill_prompts, 8),
                                                           max_num_batched_tokens=budget,
                                                           # compute, not reuse: the repeats prefill the same prompts
                                                           prefix_caching=False))
    if max_len_needed > engine.max_model_len:
        raise UsageError(f"prompts of {max_len_needed} tokens exceed the model's context of {engine.max_model_len}")
    vocab = engine.vocab_size
    rec = StepRecorder(engine)
    info = machine_info()
    print(f"kvferry bench engine: model {engine.model_name}, {opts.dtype}, {info['cpu_count']} CPUs "
          f"({info['cpu_model']}), torch {info['torch_version']} with {info['torch_threads']} threads",
          file=sys.stderr)
    pre = CPUWatch()
    time.sleep(1.0)
    busy = pre.others_cores()
    if busy is not None and busy > BUSY_CORES:
        print(f"  warning: other processes are using {busy:.1f} cores; with torch's threads spin-waiting on busy "
              f"cores the figures will be far too low", file=sys.stderr)

    t_start = time.perf_counter()
    watch = CPUWatch()
    measure_decode(rec, random_prompts(rng, 2, 16, vocab), 4, "warmup")
    measure_prefill(rec, random_prompts(rng, 2, 64, vocab), "warmup")
    rec.steps.clear()

    decode_prompts = {b: random_prompts(rng, b, opts.prompt_len, vocab) for b in opts.batch_sizes}
    records = []
    for b in opts.batch_sizes:
        for attempt in range(1 + max(0, opts.retry_busy)):
            runs = [measure_decode(rec, decode_prompts[b], n, "decode") for _ in range(opts.repeat)]
            r = max(runs, key=lambda x: x["decode_tok_s"])
            if (r["other_processes_cores"] or 0) <= BUSY_CORES:
                break
            print(f"  (batch {b}: other processes used {r['other_processes_cores']:.2f} cores; measuring again)",
                  file=sys.stderr)
        print(f"  decode batch {b:>3}: {r['step_ms']:8.1f} ms/step  {r['decode_tok_s']:8.1f} tok/s", file=sys.stderr)
        records.append(r)
    prefill_prompts = random_prompts(rng, opts.prefill_prompts, opts.prefill_len, vocab)
    for attempt in range(1 + max(0, opts.retry_busy)):
        watch_p = CPUWatch()
        prefill = max((measure_prefill(rec, prefill_prompts, "prefill") for _ in range(opts.repeat)),
                      key=lambda x: x["tok_s"])
        prefill["other_processes_cores"] = watch_p.others_cores()
        if (prefill["other_processes_cores"] or 0) <= BUSY_CORES:
            break
    print(f"  prefill {opts.prefill_prompts} x {opts.prefill_len}: {prefill['tok_s']:.0f} tok/s", file=sys.stderr)

    fit = None
    if opts.fit:
        for c in fit_ctx:
            r = measure_decode(rec, random_prompts(rng, 8, c, vocab), 16, "fit-decode")
            print(f"  fit: decode batch 8 at context {c}: {r['step_ms']:.1f} ms/step", file=sys.stderr)
        for k, m in fit_prefills:
            r = measure_prefill(rec, random_prompts(rng, k, m, vocab), "fit-prefill")
            print(f"  fit: prefill {k} x {m}: {r['ms']:.1f} ms", file=sys.stderr)
        fit = fit_latency(rec.steps)
        cfg = engine.model_config
        dtype = EngineConfig(dtype=opts.dtype).torch_dtype
        kv_bytes = cfg.kv_bytes_per_token(dtype)
        default_cap = (EngineConfig().kv_cache_bytes // (kv_bytes * block)) * block
        fit["kv_bytes_per_token"] = kv_bytes
        fit["kv_capacity_tokens"] = default_cap
        fit["literal"] = latency_literal(f"{engine.model_name}-cpu", fit["params"], default_cap, kv_bytes, vocab)
    engine_s = time.perf_counter() - t_start
    others = watch.others_cores()
    max_model_len = engine.max_model_len
    steps = list(rec.steps)
    del rec, engine  # free the weights and KV cache before vLLM starts

    vllm = {"available": False}
    if opts.no_vllm:
        vllm["skipped"] = "--no-vllm"
    elif vllm_available():
        print("  vLLM: running the same prompts in a subprocess ...", file=sys.stderr)
        vwatch = CPUWatch()
        batches = [{"batch_size": b, "prompts": decode_prompts[b]} for b in opts.batch_sizes]
        res = run_vllm(opts.model, opts.dtype, batches, prefill_prompts, n,
                       min(max_model_len, max(2048, max_len_needed)), opts.repeat, opts.retry_busy, seed=0)
        vllm = {"available": "error" not in res} | res | {"other_processes_cores": vwatch.others_cores()}
        if "error" in res:
            print(f"  {res['error']}", file=sys.stderr)
    by_b = {r["batch_size"]: r for r in vllm.get("records", [])}
    for r in records:
        v = by_b.get(r["batch_size"])
        r["vllm_decode_tok_s"] = v["decode_tok_s"] if v else None
        r["vllm_decode_tok_s_ts"] = v.get("decode_tok_s_ts") if v else None
        r["ratio"] = r["decode_tok_s"] / v["decode_tok_s"] if v and v["decode_tok_s"] else None
        if v:  # greedy agreement of batch element 0 (bf16 kernels differ, so long runs may diverge)
            ours, theirs = r["output"], v["first_output"]
            same = 0
            while same < min(len(ours), len(theirs)) and ours[same] == theirs[same]:
                same += 1
            r["vllm_greedy_agree_tokens"] = same
        del r["output"]
    for v in vllm.get("records", []):
        v.pop("first_output", None)

    result = {
        "machine": info,
        "model": opts.model,
        "dtype": opts.dtype,
        "prompt_len": opts.prompt_len,
        "decode_tokens": n,
        "records": records,
        "prefill_tok_s": prefill["tok_s"],
        "prefill": prefill,
        "vllm_version": vllm.get("version"),
        "vllm_prefill_tok_s": vllm.get("prefill_tok_s"),
        "vllm": vllm,
        "engine_bench_s": engine_s,
        "other_processes_cores": others,
    }
    if fit is not None:
        result["fit"] = fit
        result["steps"] = [asdict(s) for s in steps]
    print_table(result)
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {opts.json}", file=sys.stderr)
    return 0


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def print_table(res: dict) -> None:
    m = res["machine"]
    print(f"model {res['model']}  dtype {res['dtype']}  context ~{res['prompt_len']} tokens  "
          f"{res['decode_tokens']} timed decode steps  |  {m['cpu_count']} CPUs, torch {m['torch_version']}, "
          f"{m['torch_threads']} threads" + (f", vLLM {res['vllm_version']}" if res.get("vllm_version") else ""))
    vbusy = {v["batch_size"]: v.get("other_processes_cores") for v in res["vllm"].get("records", [])}
    print(f"{'batch':>5}  {'step_ms':>8}  {'decode_tok/s':>12}  {'vllm_tok/s':>10}  {'ratio':>6}  "
          f"{'vllm_ts':>8}  {'busy':>9}")
    for r in res["records"]:
        busy = f"{_fmt(r.get('other_processes_cores'), '.2f')}/{_fmt(vbusy.get(r['batch_size']), '.2f')}"
        print(f"{r['batch_size']:>5}  {r['step_ms']:>8.1f}  {r['decode_tok_s']:>12.1f}  "
              f"{_fmt(r['vllm_decode_tok_s'], '.1f'):>10}  {_fmt(r['ratio'], '.2f'):>6}  "
              f"{_fmt(r.get('vllm_decode_tok_s_ts'), '.1f'):>8}  {busy:>9}")
    print("(vllm_tok/s: t(1+N tokens) - t(1 token); ratio: ours / that; vllm_ts: vLLM's rate from its own token\n"
          " timestamps, a cross-check; busy: cores used by other processes during our / vLLM's measurement)")
    p = res["prefill"]
    print(f"prefill ({p['num_prompts']} prompts x {p['prompt_len']} tokens, {p['steps']} step(s)): "
          f"{p['tok_s']:.0f} tok/s  |  vLLM: {_fmt(res['vllm_prefill_tok_s'], '.0f')} tok/s")
    busy = [v for v in (res.get("other_processes_cores"), res["vllm"].get("other_processes_cores")) if v is not None]
    if busy:
        print(f"other processes used {res.get('other_processes_cores') or 0:.2f} cores on average during our engine's "
              f"run" + (f", {res['vllm']['other_processes_cores']:.2f} during vLLM's"
                        if res["vllm"].get("other_processes_cores") is not None else "")
              + ("  (WARNING: figures disturbed)" if max(busy) > 0.1 else ""))
    if not res["vllm"].get("available"):
        why = res["vllm"].get("error") or res["vllm"].get("skipped") or "vllm is not importable in this Python"
        print(f"(vLLM columns n/a: {why})")
    if res.get("fit"):
        f = res["fit"]
        print(f"fitted latency model ({f['num_steps']} steps, {f['num_dropped']} outliers dropped, median relative error "
              f"{100 * f['median_rel_error']:.1f} %, max {100 * f['max_rel_error']:.1f} %):")
        print(f["literal"])
