"""Fused paged-attention decode on CPU: a small C++ kernel (paged_decode_cpu.cpp) built on first use.

`paged_decode(q, kv_cache, block_tables, context_lens, scale)` reads each request's keys and
values straight from its cache blocks (no gather copy) and returns the attention output [B, H, D].
The extension is compiled once per machine into torch's extension cache (TORCH_EXTENSIONS_DIR);
AVX-512 flags are used only when the CPU reports them. `make install` builds it ahead of time
(`python -m engine.model.paged_decode_cpu`), so a worker start only loads the cached module. If the
build or the load fails, or KVFERRY_PAGED_KERNEL=0, `available()` is False and callers keep their
SDPA path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("paged_decode_cpu.cpp")
_lock = threading.Lock()
_module = None
_failed = False
build_seconds: float | None = None  # wall time of the first load (compile or cache hit)


def enabled() -> bool:
    return os.environ.get("KVFERRY_PAGED_KERNEL", "1") not in ("0", "false", "no", "off")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _build_flags() -> tuple[str, list[str]]:
    name, cflags = _isa_flags()
    # One build folder per checkout and source: torch rebuilds an extension whose sources moved, so
    # two checkouts sharing one name would rebuild it (~60 s, holding its lock) each time they alternate.
    tag = hashlib.sha1(str(_SOURCE.resolve()).encode() + _SOURCE.read_bytes()).hexdigest()[:10]
    return f"{name}_{tag}", cflags


def _isa_flags() -> tuple[str, list[str]]:
    flags = _cpu_flags()
    cflags = ["-O3", "-fopenmp"]
    if {"avx512f", "avx512bw", "avx512vl", "avx2", "fma"} <= flags:
        return "kvferry_paged_decode_avx512", cflags + [
            "-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl",
            "-mprefer-vector-width=512"]
    if {"avx2", "fma"} <= flags:
        return "kvferry_paged_decode_avx2", cflags + ["-mavx2", "-mfma", "-mf16c"]
    return "kvferry_paged_decode_generic", cflags


STALE_LOCK_S = 300.0  # a build takes ~30 s; a lock this old was left by a process killed mid-build


def _clear_stale_build_lock(name: str) -> None:
    """torch's extension builder waits forever on its `lock` file; a process killed while building
    leaves it behind and every later process would hang. Remove it once it is clearly stale."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = os.path.join(_get_build_directory(name, verbose=False), "lock")
        if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > STALE_LOCK_S:
            os.remove(lock)
            log.warning("removed a stale build lock %s (left by a process killed while building)", lock)
    except Exception:  # noqa: BLE001 - best effort; the build itself reports real problems
        pass


def _load():
    global _module, _failed, build_seconds
    with _lock:
        if _module is not None or _failed:
            return _module
        t0 = time.perf_counter()
        try:
            from torch.utils.cpp_extension import load

            name, cflags = _build_flags()
            _clear_stale_build_lock(name)
            _module = load(name=name, sources=[str(_SOURCE)], extra_cflags=cflags,
                           extra_ldflags=["-fopenmp"], verbose=False)
            build_seconds = time.perf_counter() - t0
            log.debug("paged decode kernel %s ready in %.1f s", name, build_seconds)  # workers log worker.load
        except Exception as e:  # no compiler, no headers, ...: keep the SDPA path
            _failed = True
            log.warning("paged decode kernel unavailable, using SDPA: %s", str(e).splitlines()[0] if str(e) else e)
        return _module


def available() -> bool:
    """True when the kernel is enabled and built (builds it on the first call)."""
    return enabled() and _load() is not None


def build_dir() -> str | None:
    """Where torch keeps (or will keep) this machine's build of the kernel."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return _get_build_directory(_build_flags()[0], verbose=False)
    except Exception:  # noqa: BLE001 - informational only
        return None


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, D], kv_cache [2, NB, BS, KVH, D], block_tables [B, MB], context_lens [B] -> [B, H, D]."""
    return _load().paged_decode(q, kv_cache, block_tables, context_lens, float(scale))


def main() -> int:
    """Build the kernel now (`make install`); exit 0 either way: workers fall back to SDPA."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not enabled():
        print("paged decode kernel disabled (KVFERRY_PAGED_KERNEL=0): workers use the SDPA path")
        return 0
    t0 = time.perf_counter()
    if available():
        print(f"paged decode kernel {_build_flags()[0]} ready in {time.perf_counter() - t0:.1f} s ({build_dir()})")
    else:
        print("paged decode kernel not built (see the warning above): workers use the SDPA path")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
