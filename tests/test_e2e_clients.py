"""The field's clients against a real kvferry cluster (`make test-clients`, marker `clients`).

One cluster per module: scheduler, 2 torch workers serving SmolLM2-135M-Instruct in float32
(policy "load": only the migration test moves a request) and the OpenAI-compatible frontend, all
on 127.0.0.1. Each test runs one client the way its users do, pointed at the local SmolLM2
tokenizer folder and synthetic or local data (nothing is downloaded), and asserts behaviour:
exit codes, no failed request, the shapes clients parse, and, where a reference exists, the
numbers: lm-evaluation-harness' log-likelihoods against its own `hf` backend on the same weights,
logprobs against transformers' log_softmax of the same GGUF. Never speed.

The benchmark and evaluation tools live in their own venv (.venv/clients, built by `make
test-clients`; see the Makefile for why), so they run as subprocesses; the official openai client
runs in this process (it is in the main venv's test extra).
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
import torch

from engine.errors import WeightsError
from engine.weights.loader import smollm2_path
from services.config import load_config
from services.launcher import ClusterSpec, LocalCluster, free_ports

try:
    GGUF_PATH = smollm2_path()
except WeightsError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"smollm2 weights not installed: {exc}", allow_module_level=True)

pytestmark = [pytest.mark.clients, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parent.parent
MODEL = "smollm2"
CLIENTS_VENV = Path(os.environ.get("KVFERRY_CLIENTS_VENV", REPO / ".venv" / "clients"))
CLIENTS_BIN = CLIENTS_VENV / "bin"
VLLM_BIN = Path(sys.executable).parent / "vllm"
WORKERS = ("worker-0", "worker-1")
TOOL_TIMEOUT_S = 300  # each client run (they take 10-40 s here); a hang fails the test, never the session
PROMPT = "The capital of France is"
# No client may reach the network: every model/tokenizer is a local folder, every dataset local or
# synthetic. HF_HUB_OFFLINE is left out for aiperf only (see test_aiperf_constant_rate).
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "VLLM_NO_USAGE_STATS": "1",
           "LITELLM_LOCAL_MODEL_COST_MAP": "True", "TOKENIZERS_PARALLELISM": "false"}


# ---- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    http, base = free_ports(len(WORKERS))
    cfg = load_config(env={}, overrides={
        "cluster": {"http_port": http, "base_port": base},
        "scheduler": {"policy": "load"},  # no load-balancing migration: only the migration test moves a request
        "worker": {"engine": "torch", "model": MODEL, "dtype": "float32", "kv_cache_bytes": 256 << 20,
                   "max_num_seqs": 32, "stop_deadline_s": 30},
        "frontend": {"model": MODEL},
    })
    c = LocalCluster(ClusterSpec(cfg, num_workers=len(WORKERS), ready_timeout_s=240))
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """SmolLM2 as a Hugging Face folder (config, safetensors, tokenizer.json, tokenizer_config.json):
    kvferry's export (engine.weights.hf_export), or, lacking tokenizer files, a copy with the
    tokenizer transformers reads from the GGUF."""
    from engine.weights.hf_export import hf_folder_for

    src = hf_folder_for(MODEL)
    if (src / "tokenizer.json").is_file() and (src / "tokenizer_config.json").is_file():
        return src
    from transformers import AutoTokenizer

    dest = tmp_path_factory.mktemp("smollm2-hf")
    for f in src.iterdir():
        if f.is_file():
            (dest / f.name).symlink_to(f)
    AutoTokenizer.from_pretrained(str(GGUF_PATH.parent), gguf_file=GGUF_PATH.name).save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def oracle():
    """transformers' model and tokenizer from the same GGUF file, float32 (as tests/test_smollm2.py)."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF file")
    from tests.hf_oracle import smollm2_oracle

    return smollm2_oracle(GGUF_PATH)


@pytest.fixture
def client(cluster):
    c = openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key="x", timeout=120, max_retries=0)
    yield c
    c.close()


# ---- helpers ---------------------------------------------------------------------------------------

def need(path: Path, how: str) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is missing: {how}")
    return path


def clients_tool(name: str) -> Path:
    return need(CLIENTS_BIN / name, "`make test-clients` installs the clients venv")


def run_tool(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = TOOL_TIMEOUT_S,
             offline: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a client command to completion (bounded); fail with its output's tail if it exits non-zero."""
    full_env = {**os.environ, **(OFFLINE if offline else {}), "HF_HOME": str(cwd / "hf-home"), **(env or {})}
    if not offline:
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            full_env.pop(k, None)
    try:
        out = subprocess.run([str(a) for a in args], cwd=cwd, env=full_env, capture_output=True, text=True,
                             timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-3000:] if isinstance(exc.stdout, bytes) else (exc.stdout or "")[-3000:]
        pytest.fail(f"{Path(args[0]).name} still running after {timeout} s: {tail}")
    assert out.returncode == 0, (f"{' '.join(map(str, args))}\nexit {out.returncode}\n"
                                 f"stdout: {out.stdout[-4000:]}\nstderr: {out.stderr[-4000:]}")
    return out


def token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax over the vocabulary at every position of `ids` (row i: the distribution of token i+1)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(token_logprobs(model, ids)[-1].argmax()))
    return ids[len(prompt):]


def tokenize(cluster: LocalCluster, text: str) -> list[int]:
    r = httpx.post(f"{cluster.http_url}/tokenize", json={"model": MODEL, "prompt": text}, timeout=30)
    r.raise_for_status()
    return r.json()["tokens"]


# ---- 1. vllm bench serve ---------------------------------------------------------------------------

BENCH_PROMPTS = 16
BENCH_OUT = 8


@pytest.mark.parametrize("backend,endpoint", [("openai", "/v1/completions"), ("openai-chat", "/v1/chat/completions")])
def test_vllm_bench_serve(cluster, hf_folder, tmp_path, backend, endpoint):
    vllm = need(VLLM_BIN, "`make install-vllm` installs vLLM's CPU build")
    run_tool([vllm, "bench", "serve", "--backend", backend, "--base-url", cluster.http_url, "--endpoint", endpoint,
              "--model", MODEL, "--tokenizer", hf_folder, "--dataset-name", "random", "--random-input-len", "32",
              "--random-output-len", str(BENCH_OUT), "--num-prompts", str(BENCH_PROMPTS), "--max-concurrency", "8",
              "--request-rate", "inf", "--seed", "1", "--ignore-eos", "--temperature", "0", "--num-warmups", "0",
              "--ready-check-timeout-sec", "0", "--disable-tqdm", "--save-result", "--result-dir", tmp_path,
              "--result-filename", "result.json"], cwd=tmp_path)
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["completed"] == BENCH_PROMPTS and res["failed"] == 0, res
    assert res["total_output_tokens"] == BENCH_PROMPTS * BENCH_OUT  # ignore_eos: every request runs to max_tokens
    assert res["mean_ttft_ms"] > 0 and res["median_ttft_ms"] > 0
    assert res["mean_tpot_ms"] > 0 and res["mean_itl_ms"] > 0


# ---- 2. guidellm and aiperf ------------------------------------------------------------------------

LOAD_REQUESTS = 6


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_guidellm_constant_rate(cluster, hf_folder, tmp_path, stream):
    guidellm = clients_tool("guidellm")
    backend = f"kind=openai_http,target={cluster.http_url},model={MODEL},stream={str(stream).lower()}"
    out = run_tool([guidellm, "run", "--backend", backend,
                    "--profile", "kind=constant,rate=2", "--constraint", f"kind=max_requests,count={LOAD_REQUESTS}",
                    "--tokenizer", f"kind=huggingface_auto,model={hf_folder}",
                    "--data", "kind=synthetic_text,prompt_tokens=32,output_tokens=8",
                    "--output", f"kind=json,path={tmp_path / 'guidellm.json'}", "--disable-console-interactive"],
                   cwd=tmp_path)
    bench = json.loads((tmp_path / "guidellm.json").read_text())["benchmarks"][0]
    made = bench["scheduler_metrics"]["requests_made"]
    errors = [r.get("info", {}).get("error") for r in bench.get("requests", {}).get("errored", [])][:2]
    # guidellm's max_requests constraint sometimes stops one request short: every request it made succeeded
    assert made["errored"] == made["incomplete"] == 0 and made["successful"] == made["total"] >= LOAD_REQUESTS - 1, \
        (made, errors, out.stdout[-2000:])
    assert 0 < bench["metrics"]["output_token_count"]["successful"]["mean"] <= 8
    assert bench["metrics"]["request_latency"]["successful"]["mean"] > 0


@pytest.mark.parametrize("endpoint_type", ["chat", "completions"])
def test_aiperf_constant_rate(cluster, hf_folder, tmp_path, endpoint_type):
    aiperf = clients_tool("aiperf")
    # offline=False: aiperf 0.13 loads a tokenizer through huggingface_hub's snapshot_download when
    # HF_HUB_OFFLINE is set, which fails for a local folder; without it a local path loads directly
    # (nothing is fetched: the tokenizer is a folder, the prompts are synthetic).
    run_tool([aiperf, "profile", "--model", MODEL, "--url", cluster.http_url, "--endpoint-type", endpoint_type,
              "--streaming", "--tokenizer", hf_folder, "--isl", "32", "--osl", "8", "--request-rate", "2",
              "--request-rate-mode", "constant", "--request-count", str(LOAD_REQUESTS), "--random-seed", "1",
              "--artifact-dir", tmp_path / "aiperf", "--ui-type", "none"], cwd=tmp_path, offline=False)
    res = json.loads((tmp_path / "aiperf" / "profile_export_aiperf.json").read_text())
    assert not res.get("error_summary"), res["error_summary"]
    assert not res.get("was_cancelled")
    assert res["request_count"]["avg"] == LOAD_REQUESTS
    # the server's usage: at most the 8 tokens asked for (aiperf sends no ignore_eos: SmolLM2 may end
    # an answer early; aiperf's own count re-tokenizes the text, which may merge two tokens into one)
    assert 1 <= res["usage_completion_tokens"]["min"] <= res["usage_completion_tokens"]["max"] <= 8
    assert 0 < res["output_sequence_length"]["min"] <= 8
    assert res["time_to_first_token"]["min"] > 0


# ---- 3. lm-evaluation-harness ----------------------------------------------------------------------

MC_DOCS = [
    ("What is the capital of France?", ["Paris", "London", "Berlin", "Madrid"], 0),
    ("How many legs does a spider have?", ["Six", "Eight", "Four", "Ten"], 1),
    ("What color is the sky on a clear day?", ["Green", "Red", "Blue", "Yellow"], 2),
    ("Which animal says moo?", ["Dog", "Cat", "Duck", "Cow"], 3),
    ("What is two plus two?", ["Four", "Five", "Three", "Six"], 0),
    ("Which planet do we live on?", ["Mars", "Earth", "Venus", "Jupiter"], 1),
    ("What do bees make?", ["Milk", "Silk", "Honey", "Wool"], 2),
    ("What is frozen water called?", ["Steam", "Sand", "Glass", "Ice"], 3),
]
GEN_DOCS = [("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Germany", "Berlin")]


def write_tasks(d: Path) -> Path:
    """Two lm-eval tasks over local JSONL files (dataset_path: json): kvf_mc (multiple_choice, log-likelihood)
    and kvf_gen (generate_until). Returns the --include_path folder."""
    tasks = d / "tasks"
    tasks.mkdir()
    (d / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "label": label}) + "\n"
                                        for q, c, label in MC_DOCS))
    (d / "gen.jsonl").write_text("".join(json.dumps({"country": c, "answer": a}) + "\n" for c, a in GEN_DOCS))
    (tasks / "kvf_mc.yaml").write_text(textwrap.dedent(f"""\
        task: kvf_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {d / 'mc.jsonl'}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{label}}}}"
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """))
    (tasks / "kvf_gen.yaml").write_text(textwrap.dedent(f"""\
        task: kvf_gen
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {d / 'gen.jsonl'}
        test_split: test
        output_type: generate_until
        doc_to_text: "What is the capital of {{{{country}}}}? Answer with one word."
        doc_to_target: "{{{{answer}}}}"
        generation_kwargs:
          until: ["\\n\\n"]
          max_gen_toks: 16
          do_sample: false
          temperature: 0.0
        filter_list:
          - name: city
            filter:
              - function: regex
                regex_pattern: "(Paris|Rome|Tokyo|Berlin)"
              - function: take_first
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """))
    return tasks


def lm_eval(tmp_path: Path, tasks: Path, task: str, model: str, model_args: str, out: str,
            *extra: str) -> tuple[dict, dict[int, dict]]:
    """One `lm_eval` run with --log_samples: (the task's results, its samples by doc id)."""
    run_tool([clients_tool("lm_eval"), "--model", model, "--model_args", model_args, "--tasks", task,
              "--include_path", tasks, "--output_path", tmp_path / out, "--log_samples", "--seed", "1234", *extra],
             cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    (results,) = glob.glob(str(tmp_path / out / "*" / "results_*.json"))
    (samples,) = glob.glob(str(tmp_path / out / "*" / f"samples_{task}_*.jsonl"))
    docs = {d["doc_id"]: d for d in map(json.loads, Path(samples).read_text().splitlines())}
    return json.loads(Path(results).read_text())["results"][task], docs


def test_lm_eval_loglikelihood_equals_hf_backend(cluster, hf_folder, tmp_path):
    """local-completions (lm-eval tokenizes with the SmolLM2 folder and sends token ids, echo +
    logprobs) against lm-eval's own `hf` backend on the same weights in float32."""
    tasks = write_tasks(tmp_path)
    api, api_docs = lm_eval(tmp_path, tasks, "kvf_mc", "local-completions",
                            f"model={MODEL},base_url={cluster.http_url}/v1/completions,tokenizer={hf_folder},"
                            "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=2,max_retries=1,"
                            "timeout=120", "api")
    hf, hf_docs = lm_eval(tmp_path, tasks, "kvf_mc", "hf", f"pretrained={hf_folder},dtype=float32", "hf",
                          "--device", "cpu", "--batch_size", "8")
    assert api["acc,none"] == pytest.approx(hf["acc,none"], abs=1e-3)
    assert sorted(api_docs) == sorted(hf_docs) == list(range(len(MC_DOCS)))
    for doc_id, doc in api_docs.items():
        ref = hf_docs[doc_id]
        assert doc["arguments"] == ref["arguments"]  # the same (context, continuation) pairs
        got = [(float(r[0][0]), r[0][1]) for r in doc["resps"]]
        want = [(float(r[0][0]), r[0][1]) for r in ref["resps"]]
        assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-2), doc["doc"]
        assert [g[1] for g in got] == [w[1] for w in want], f"is_greedy differs: {doc['doc']}"
        assert doc["acc"] == ref["acc"]


def test_lm_eval_chat_generate_until(cluster, tmp_path):
    tasks = write_tasks(tmp_path)
    res, docs = lm_eval(tmp_path, tasks, "kvf_gen", "local-chat-completions",
                        f"model={MODEL},base_url={cluster.http_url}/v1/chat/completions,num_concurrent=2,"
                        "max_retries=1,timeout=120", "chat", "--apply_chat_template")
    assert len(docs) == len(GEN_DOCS)
    for doc in docs.values():
        assert doc["resps"][0][0].strip(), doc  # a non-empty answer per question
    # Greedy SmolLM2-135M-Instruct names all four capitals (checked against transformers in
    # test_smollm2 for France); the harness' regex filter extracts the city.
    assert res["exact_match,city"] == 1.0, [d["resps"] for d in docs.values()]


# ---- 4. the official openai client -----------------------------------------------------------------

LOGPROB_TOKENS = 6
TOP = 5


def check_top(top: dict[str, float], row: torch.Tensor, tok, k: int) -> None:
    """`top` (token text → logprob) holds the k most likely tokens of `row`, with their logprobs."""
    vals, ids = row.topk(k + 2)
    ref = {tok.decode([int(i)]): float(v) for v, i in zip(vals, ids)}
    ranked = list(ref)
    for text, lp in top.items():
        assert text in ref, f"{text!r} is not among the oracle's top {k + 2}: {ranked}"
        assert lp == pytest.approx(ref[text], abs=1e-3), text
    # the k best of the oracle are listed, unless the k-th and (k+1)-th are a near tie
    if abs(float(vals[k - 1]) - float(vals[k])) > 1e-3:
        assert set(ranked[:k]) <= set(top), (top, ranked[:k])


def test_openai_completion_logprobs_equal_transformers(cluster, client, oracle):
    model, tok = oracle
    prompt_ids = tokenize(cluster, PROMPT)
    assert prompt_ids == tok.encode(PROMPT, add_special_tokens=False)
    want = greedy(model, prompt_ids, LOGPROB_TOKENS)
    lps = token_logprobs(model, prompt_ids + want)

    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=LOGPROB_TOKENS, temperature=0, logprobs=TOP,
                                  extra_body={"ignore_eos": True})
    (choice,) = r.choices
    lp = choice.logprobs
    assert choice.text == tok.decode(want)
    assert lp.tokens == [tok.decode([t]) for t in want]
    n = len(prompt_ids)
    for i, t in enumerate(want):
        assert lp.token_logprobs[i] == pytest.approx(float(lps[n - 1 + i, t]), abs=1e-3), (i, lp.tokens[i])
        check_top(lp.top_logprobs[i], lps[n - 1 + i], tok, TOP)
    assert r.usage.prompt_tokens == n and r.usage.completion_tokens == LOGPROB_TOKENS

    # echo + logprobs, max_tokens 0: the prompt's own tokens, the first without a logprob
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, temperature=0)
    (choice,) = r.choices
    assert choice.text == PROMPT
    assert choice.logprobs.tokens == [tok.decode([t]) for t in prompt_ids]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    for i in range(1, n):
        assert choice.logprobs.token_logprobs[i] == pytest.approx(float(lps[i - 1, prompt_ids[i]]), abs=1e-3), i
    assert r.usage.completion_tokens == 0

    # echo + generated tokens: prompt first, then the greedy continuation, one logprob list
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, echo=True, logprobs=1, temperature=0,
                                  extra_body={"ignore_eos": True})
    (choice,) = r.choices
    assert choice.text == PROMPT + tok.decode(want[:3])
    got = choice.logprobs.token_logprobs
    ids = prompt_ids + want[:3]
    assert len(got) == len(ids) and got[0] is None
    assert got[1:] == pytest.approx([float(lps[i - 1, ids[i]]) for i in range(1, len(ids))], abs=1e-3)


def test_openai_chat_logprobs_equal_transformers(client, oracle):
    model, tok = oracle
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt_ids = prompt_ids["input_ids"] if not isinstance(prompt_ids, list) else prompt_ids
    want = greedy(model, prompt_ids, LOGPROB_TOKENS)
    lps = token_logprobs(model, prompt_ids + want)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=LOGPROB_TOKENS, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert r.choices[0].message.content == tok.decode(want)
    assert [c.token for c in content] == [tok.decode([t]) for t in want]
    n = len(prompt_ids)
    for i, (c, t) in enumerate(zip(content, want)):
        assert c.logprob == pytest.approx(float(lps[n - 1 + i, t]), abs=1e-3), (i, c.token)
        assert c.bytes == list(c.token.encode())
        assert len(c.top_logprobs) == 3
        check_top({x.token: x.logprob for x in c.top_logprobs}, lps[n - 1 + i], tok, 3)
    assert r.usage.prompt_tokens == n


def test_openai_n3_seeded_is_reproducible(client):
    kw = {"model": MODEL, "prompt": "Once upon a time", "n": 3, "seed": 7, "temperature": 1.0, "max_tokens": 12,
          "extra_body": {"ignore_eos": True}}
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(first.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert len(set(texts)) == 3, texts
    assert [c.text for c in sorted(again.choices, key=lambda c: c.index)] == texts
    assert first.usage.completion_tokens == 3 * 12
    # sample j is the n=1 sample with seed + j
    single = client.completions.create(**{**kw, "n": 1, "seed": 8})
    assert single.choices[0].text == texts[1]
    # chat too
    ckw = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], "n": 3, "seed": 11,
           "temperature": 1.0, "max_tokens": 10}
    a = [c.message.content for c in sorted(client.chat.completions.create(**ckw).choices, key=lambda c: c.index)]
    b = [c.message.content for c in sorted(client.chat.completions.create(**ckw).choices, key=lambda c: c.index)]
    assert len(a) == 3 and a == b and len(set(a)) == 3, a


def test_openai_models_tokenize_version(cluster, client, hf_folder):
    (m,) = client.models.list().data
    assert m.id == MODEL
    cfg = json.loads((hf_folder / "config.json").read_text())
    assert m.model_extra["max_model_len"] == cfg["max_position_embeddings"]
    ids = tokenize(cluster, "Hello world")
    r = httpx.post(f"{cluster.http_url}/detokenize", json={"model": MODEL, "tokens": ids}, timeout=30)
    assert r.status_code == 200 and r.json()["prompt"] == "Hello world", r.text
    assert httpx.get(f"{cluster.http_url}/version", timeout=30).json()["version"]


MIGRATE_TOKENS = 256  # outlives a `kvferry ctl migrate` round trip (a process start, ~1-2 s) at ~10-20 tokens/s


async def stream_logprobs(aclient: openai.AsyncOpenAI, ids: asyncio.Queue | None) -> tuple[str, list, list]:
    """A greedy streamed completion with logprobs: (text, tokens, token logprobs); its id to `ids` first."""
    s = await aclient.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MIGRATE_TOKENS, temperature=0,
                                         logprobs=2, stream=True, extra_body={"ignore_eos": True})
    text, toks, lps = [], [], []
    async for chunk in s:
        if ids is not None:
            await ids.put(chunk.id)
            ids = None
        for ch in chunk.choices:
            text.append(ch.text)
            if ch.logprobs:
                toks += ch.logprobs.tokens
                lps += ch.logprobs.token_logprobs
    return "".join(text), toks, lps


async def test_openai_logprobs_stream_survives_ctl_migrate(cluster, oracle):
    from tests.test_e2e_migration import ctl_migrate, locate, locate_soon

    model, tok = oracle
    aclient = openai.AsyncOpenAI(base_url=f"{cluster.http_url}/v1", api_key="x", timeout=300, max_retries=0)
    ids: asyncio.Queue = asyncio.Queue()
    task = asyncio.ensure_future(stream_logprobs(aclient, ids))
    try:
        rid = await asyncio.wait_for(ids.get(), 120)
        found = await locate_soon(cluster, rid)
        worker_rid, src = found
        dst = next(w for w in WORKERS if w != src)
        await ctl_migrate(cluster, worker_rid, dst)
        assert (await locate(cluster, rid)) == (worker_rid, dst)
        assert not task.done(), "the stream ended before the migration: raise MIGRATE_TOKENS"
        text, toks, lps = await asyncio.wait_for(task, 300)
        # the unmigrated twin, alone on the cluster afterwards
        ref_text, ref_toks, ref_lps = await asyncio.wait_for(stream_logprobs(aclient, None), 300)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await aclient.close()
    assert len(toks) == len(lps) == MIGRATE_TOKENS
    assert text == ref_text and toks == ref_toks
    assert lps == pytest.approx(ref_lps, abs=1e-4)
    # and both are transformers' greedy continuation, with its logprobs, for the first tokens
    prompt_ids = tokenize(cluster, PROMPT)
    want = greedy(model, prompt_ids, LOGPROB_TOKENS)
    ref = token_logprobs(model, prompt_ids + want)
    assert toks[:LOGPROB_TOKENS] == [tok.decode([t]) for t in want]
    assert lps[:LOGPROB_TOKENS] == pytest.approx(
        [float(ref[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(want)], abs=1e-3)


# ---- 4b. the official openai client: forced tool calls, across `kvferry ctl migrate` -----------------

# A forced call whose arguments take a while to write (30 strings: some 150-250 tokens), so that
# the stream is still running when the migration lands.
RECORD = {"type": "function", "function": {
    "name": "record_words", "description": "Record a list of English words",
    "parameters": {"type": "object", "properties": {
        "words": {"type": "array", "minItems": 30, "maxItems": 30,
                  "items": {"type": "string", "minLength": 1, "maxLength": 10}}},
        "required": ["words"], "additionalProperties": False}}}
ASK_WORDS = [{"role": "user", "content": "Record thirty different English words."}]
TOOL_KW = {"model": MODEL, "messages": ASK_WORDS, "tools": [RECORD], "tool_choice": "required", "max_tokens": 600}


def check_call(name: str, arguments: str) -> None:
    assert name == "record_words"
    jsonschema.validate(json.loads(arguments), RECORD["function"]["parameters"])


async def stream_calls(aclient: openai.AsyncOpenAI, ids: asyncio.Queue | None,
                       **kw) -> dict[int, tuple[list[tuple[str, str]], str | None]]:
    """A streamed forced tool call: per choice index, ((name, arguments) of each delta.tool_calls
    entry, its finish_reason); the response id goes to `ids` with the first chunk."""
    s = await aclient.chat.completions.create(**TOOL_KW, stream=True, **kw)
    out: dict[int, tuple[list[tuple[str, str]], str | None]] = {}
    async for chunk in s:
        if ids is not None:
            await ids.put(chunk.id)
            ids = None
        for ch in chunk.choices:
            calls, finish = out.get(ch.index, ([], None))
            for c in ch.delta.tool_calls or []:
                assert c.index == len(calls) and c.id.startswith("call_") and c.type == "function", c
                calls.append((c.function.name, c.function.arguments))
            out[ch.index] = (calls, ch.finish_reason or finish)
    return out


async def migrated_and_reference(cluster: LocalCluster, locate_id, **kw) -> tuple[dict, dict]:
    """A `stream_calls` run whose request `locate_id(response id)` is moved to the other worker by
    `kvferry ctl migrate` while it streams, then an unmigrated twin, alone on the cluster afterwards."""
    from tests.test_e2e_migration import ctl_migrate, locate, locate_soon

    aclient = openai.AsyncOpenAI(base_url=f"{cluster.http_url}/v1", api_key="x", timeout=300, max_retries=0)
    ids: asyncio.Queue = asyncio.Queue()
    task = asyncio.ensure_future(stream_calls(aclient, ids, **kw))
    try:
        rid = locate_id(await asyncio.wait_for(ids.get(), 120))
        worker_rid, src = await locate_soon(cluster, rid)
        dst = next(w for w in WORKERS if w != src)
        await ctl_migrate(cluster, worker_rid, dst)
        assert (await locate(cluster, rid)) == (worker_rid, dst)
        assert not task.done(), "the stream ended before the migration: lengthen RECORD's arguments"
        moved = await asyncio.wait_for(task, 300)
        ref = await asyncio.wait_for(stream_calls(aclient, None, **kw), 300)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await aclient.close()
    return moved, ref


async def test_openai_forced_tool_call_survives_ctl_migrate(cluster):
    aclient = openai.AsyncOpenAI(base_url=f"{cluster.http_url}/v1", api_key="x", timeout=300, max_retries=0)
    try:
        whole = await aclient.chat.completions.create(**TOOL_KW, temperature=0)
    finally:
        await aclient.close()
    (choice,) = whole.choices
    assert choice.finish_reason == "tool_calls" and not choice.message.content, choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    check_call(call.function.name, call.function.arguments)

    moved, ref = await migrated_and_reference(cluster, lambda rid: rid, temperature=0)
    assert list(moved) == list(ref) == [0]
    assert moved[0] == ref[0], "the migrated stream's tool call differs from an unmigrated run"
    assert moved[0] == ([(call.function.name, call.function.arguments)], "tool_calls")  # greedy: the whole answer's


async def test_openai_n3_seeded_tool_calls_survive_ctl_migrate_of_one_choice(cluster):
    """n=3: one engine request per choice, `<response id>-<index>`; choice 1's alone is moved."""
    moved, ref = await migrated_and_reference(cluster, lambda rid: f"{rid}-1", n=3, seed=5, temperature=1.0)
    assert sorted(moved) == sorted(ref) == [0, 1, 2]
    for k in range(3):
        calls, finish = moved[k]
        assert finish == "tool_calls" and len(calls) == 1, (k, moved[k])
        check_call(*calls[0])
        assert moved[k] == ref[k], f"choice {k} differs from an unmigrated run"
    assert len({moved[k][0][0][1] for k in range(3)}) > 1, moved  # seed + k: the choices are different samples


# ---- 5. LangChain and litellm ----------------------------------------------------------------------

def chat_library(cluster: LocalCluster, tmp_path: Path, library: str) -> dict:
    """tests/clients/chat_libraries.py's entry for `library`, run in the clients venv (its error fails)."""
    python = clients_tool("python")
    out = run_tool([python, REPO / "tests" / "clients" / "chat_libraries.py", cluster.http_url, MODEL, library],
                   cwd=tmp_path)
    res = json.loads(out.stdout.strip().splitlines()[-1])[library]
    assert "error" not in res, res.get("traceback", res)
    return res


@pytest.mark.parametrize("library", ["langchain", "litellm"])
def test_chat_library_invoke_and_stream(cluster, tmp_path, library):
    res = chat_library(cluster, tmp_path, library)
    assert res["invoke"] and "Paris" in res["invoke"], res
    assert res["stream"] == res["invoke"], res  # greedy: streamed text equals the invoked one
    assert res["chunks"] > 1, res
    assert res["finish_reason"] in ("stop", "length"), res
    usage = res["usage"]
    assert 0 < (usage.get("output_tokens") or usage.get("completion_tokens")) <= 12, usage


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}  # (chat_libraries.py's; as tests/test_e2e_structured.py's)
CAPITAL = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                            "country": {"type": "string", "maxLength": 30}},
           "required": ["city", "country"], "additionalProperties": False}


def test_langchain_bind_tools_and_structured_output(cluster, tmp_path):
    res = chat_library(cluster, tmp_path, "langchain-tools")
    for choice in ("any", "get_weather"):  # "any": langchain-openai sends "required"; a name: the named function
        r = res[choice]
        assert r["finish_reason"] == "tool_calls" and len(r["invoke"]) == 1, (choice, r)
        (call,) = r["invoke"]
        assert call["name"] == "get_weather" and call["type"] == "tool_call" and call["id"].startswith("call_"), r
        assert isinstance(call["args"], dict), r
        jsonschema.validate(call["args"], WEATHER["function"]["parameters"])
        # the streamed chunks' sum: the same call (greedy), its id the server's fresh one
        assert [(c["name"], c["args"]) for c in r["stream"]] == [(call["name"], call["args"])], (choice, r)
        assert r["stream_finish_reason"] == "tool_calls" and r["chunks"] > 1, (choice, r)
    for kind, typ in (("pydantic", "Capital"), ("json_schema", "dict")):  # with_structured_output(method="json_schema")
        assert res[kind]["type"] == typ, res[kind]
        jsonschema.validate(res[kind]["value"], CAPITAL)


def test_litellm_named_tool_choice(cluster, tmp_path):
    res = chat_library(cluster, tmp_path, "litellm-tools")
    assert res["finish_reason"] == "tool_calls" and len(res["tool_calls"]) == 1, res
    (call,) = res["tool_calls"]
    assert call["name"] == "get_weather" and call["type"] == "function" and call["id"].startswith("call_"), res
    jsonschema.validate(json.loads(call["arguments"]), WEATHER["function"]["parameters"])


def test_no_tool_left_work_on_the_cluster(cluster):
    """Last: every client's requests finished; no worker holds a block or a request (runs after the
    others in file order)."""
    from tests.test_e2e_cluster import wait_idle

    wait_idle(cluster)
