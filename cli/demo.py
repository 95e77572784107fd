"""`kvferry demo`: start a local cluster, stream answers through the official openai client,
show `kvferry ctl status`, stop everything."""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time

QUESTIONS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="start a local cluster and chat with it through the openai client",
                       description="Starts `kvferry up` (2 workers, SmolLM2 on the CPU), streams answers to a few "
                                   "chat questions concurrently with the official openai client, prints "
                                   "`kvferry ctl status`, and stops everything.")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--base-port", type=int, default=17100)
    p.set_defaults(func=run)


def demo_cluster(args: argparse.Namespace):  # noqa: ANN201 - LocalCluster, imported lazily
    """The (not yet started) cluster `kvferry up` would start for the demo's settings."""
    from cli.main import build_parser  # `kvferry up`'s own flags and defaults: they cannot drift apart
    from cli.up import cluster_from_args

    return cluster_from_args(build_parser().parse_args([
        "up", "--workers", str(args.workers), "--engine", "torch", "--model", args.model, "--device", "cpu",
        "--http-port", str(args.http_port), "--base-port", str(args.base_port)]))


def run(args: argparse.Namespace) -> int:
    try:
        import openai
    except ImportError:
        print("error: the demo needs the openai package (pip install openai)", file=sys.stderr)
        return 2
    cluster = demo_cluster(args)
    cluster.spec.extra_env["KVFERRY_LOG_LEVEL"] = "WARNING"  # keep the demo's output readable
    cluster.spec.on_progress = lambda line: print(f"  {line}", flush=True)
    print(f"starting {args.workers} workers serving {args.model} on the CPU ...", flush=True)
    t0 = time.monotonic()
    cluster.start()
    try:
        print(f"cluster ready in {time.monotonic() - t0:.1f} s: {cluster.http_url}/v1\n", flush=True)
        client = openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key="demo", timeout=120)
        answers: dict[int, str] = {}
        ids: dict[int, str] = {}

        def ask(i: int) -> None:
            stream = client.chat.completions.create(
                model=client.models.list().data[0].id, stream=True, max_tokens=args.max_tokens, temperature=0,
                messages=[{"role": "user", "content": QUESTIONS[i]}])
            parts = []
            for chunk in stream:
                ids[i] = chunk.id
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
            answers[i] = "".join(parts)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(QUESTIONS))]
        t1 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        for i, q in enumerate(QUESTIONS):
            print(f"Q: {q}\nA: {answers.get(i, '(no answer)').strip()}   [{ids.get(i, '')}]\n", flush=True)
        print(f"{len(QUESTIONS)} concurrent streams in {time.monotonic() - t1:.1f} s\n", flush=True)
        subprocess.run([sys.executable, "-m", "cli.main", "ctl", "status", "--base-port", str(args.base_port)],
                       check=False, timeout=30)
    finally:
        cluster.stop()
    print("\ncluster stopped", flush=True)
    return 0
