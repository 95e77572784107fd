"""Torch work off the engine thread leaves no OpenMP team behind (services.worker.torch_threads):
a live thread that ran one parallel torch op makes libgomp throttle every team, and the engine's
decode steps ran 1.65x slower served than in process. Checked by the process's thread count, in
a subprocess with 2 torch threads (a parallel op there starts one OpenMP worker thread)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

PRELUDE = textwrap.dedent("""
    import os, torch
    torch.set_num_threads(2)
    def threads():
        return len(os.listdir("/proc/self/task"))
    big = torch.empty(1 << 24, dtype=torch.uint8)  # 16 MiB: far above torch's parallel grain size
""")


def run(body: str) -> str:
    out = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], capture_output=True, text=True,
                         timeout=120, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_parallel_op_on_a_live_thread_leaves_an_openmp_thread_the_check_sees():
    # the yardstick: torch's own zero_ starts an OpenMP worker that stays
    assert run("n = threads(); big.zero_(); print(threads() - n)") == "1"


def test_touch_zero_zeroes_without_an_openmp_team():
    assert run("""
        from kv_transfer.base import touch_zero
        buf = torch.empty(1 << 23, dtype=torch.bfloat16)
        n = threads()
        touch_zero(buf)
        print(threads() - n, int(buf.view(torch.int16).abs().max()))
    """) == "0 0"


def test_fresh_thread_executor_takes_its_openmp_team_with_it():
    assert run("""
        import asyncio
        from services.worker.torch_threads import FreshThreadExecutor, on_fresh_thread
        n = threads()
        ex = FreshThreadExecutor(2, "copy", nice=None)
        futs = [ex.submit(lambda: big.zero_().numel()) for _ in range(3)]
        sizes = [f.result(30) for f in futs]
        ex.shutdown(wait=True)
        assert asyncio.run(on_fresh_thread(lambda x: big.add_(x).numel(), 1)) == big.numel()
        import time
        deadline = time.monotonic() + 10
        while threads() != n and time.monotonic() < deadline:  # a finished thread's exit may lag its result
            time.sleep(0.01)
        print(threads() - n, sizes == [big.numel()] * 3)
    """) == "0 True"


def test_fresh_thread_executor_propagates_errors_and_refuses_after_shutdown():
    assert run("""
        from services.worker.torch_threads import FreshThreadExecutor
        ex = FreshThreadExecutor(1, "copy")
        f = ex.submit(lambda: 1 / 0)
        try:
            f.result(10)
        except ZeroDivisionError:
            print("raised")
        ex.shutdown()
        try:
            ex.submit(print, "never")
        except RuntimeError:
            print("refused")
    """).split() == ["raised", "refused"]
