"""A `kvferry worker` child process for tests and benches: stdout and stderr each to a file in
`log_dir`; `ready()` waits, bounded, for its READY line; `stop()` (SIGTERM, SIGKILL if it
lingers) or `kill()` in the caller's finally."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from testkit.wait import WaitTimeout, until

ROOT = Path(__file__).resolve().parents[1]
KVFERRY = [sys.executable, "-m", "cli.main"]
READY_S = 180.0  # generous: on a loaded machine a torch worker's first start may build the paged-decode kernel


class WorkerProcess:
    """`kvferry worker --base-port B --scheduler S [--index I] *args`, cwd the repository root,
    env: os.environ + KVFERRY_LOG_LEVEL=INFO + `env`. Errors raise `error_type`."""

    def __init__(self, base_port: int, log_dir: Path, *args: str, index: int | None = None,
                 scheduler: str | None = None, env: dict[str, str] | None = None, name: str | None = None,
                 error_type: type[Exception] = AssertionError, die_with_parent: bool = False) -> None:
        self.index = 0 if index is None else index
        self.worker_id = f"worker-{self.index}"
        self.name = name or self.worker_id
        self.error_type = error_type
        self.control = f"tcp://127.0.0.1:{base_port + 100 + 2 * self.index}"
        self.out_path = log_dir / f"{self.name}.out"
        self.log_path = log_dir / f"{self.name}.log"
        cmd = [*KVFERRY, "worker", *(["--index", str(index)] if index is not None else []),
               "--base-port", str(base_port), "--scheduler", scheduler or f"tcp://127.0.0.1:{base_port}", *args]
        full_env = {**os.environ, "KVFERRY_LOG_LEVEL": "INFO", **(env or {})}
        preexec = None
        if die_with_parent:
            from services.launcher import _die_with_parent
            preexec = _die_with_parent
        with open(self.out_path, "wb") as out, open(self.log_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         env=full_env, preexec_fn=preexec)  # noqa: PLW1509 - one prctl call

    def _ready_line(self) -> str | None:
        text = self.out_path.read_text(errors="replace")
        return next((ln.strip() for ln in text.splitlines(keepends=True)
                     if ln.startswith("READY ") and ln.endswith("\n")), None)

    async def ready(self, timeout: float = READY_S) -> str:
        """Its `READY worker <id> <control>` line, once printed (model load and kernel build can take
        a while); raises if it exits first or does not get there within `timeout`."""
        def ready_or_gone() -> str | None:
            line = self._ready_line()
            if line is None and self.proc.poll() is not None:
                raise self.error_type(f"{self.worker_id} exited with status {self.proc.returncode} before READY")
            return line
        try:
            return await until(ready_or_gone, timeout, f"{self.worker_id}'s READY line", step_s=0.1)
        except WaitTimeout:
            raise self.error_type(f"{self.worker_id} not READY within {timeout:.0f} s") from None

    async def wait_exit(self, timeout: float) -> int | None:
        """Its exit status once it exits within `timeout`, else None."""
        try:
            await until(lambda: self.proc.poll() is not None, timeout, f"{self.worker_id} to exit", step_s=0.05)
        except WaitTimeout:
            pass
        return self.proc.poll()

    def stop(self, term_s: float = 10.0) -> None:
        """SIGTERM (a clean stop frees its shared-memory buffers), SIGKILL after `term_s`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(term_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def logs(self) -> str:
        """The log's tail, with the worker's stacks when it is still running (SIGUSR1): for a failing test."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(0.5)
        return self.log_tail(6000)

    async def wait_log(self, text: str, count: int = 1, timeout: float = 30.0) -> None:
        """Until the worker's log has `text` at least `count` times (a state, not a sleep)."""
        def seen() -> bool:
            assert self.proc.poll() is None, f"the worker exited: {self.logs()}"
            return self.log_text().count(text) >= count
        await until(seen, timeout, f"{text!r} (x{count}) in the worker's log", step_s=0.05)
