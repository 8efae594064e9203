"""Run tool calls in worker processes, each call with a deadline and a memory limit.

The discipline of the math-verify pool (`rewards.math_pool`, which explains why fresh interpreters
and our own pipes rather than an executor): a call that raises comes back as a short error text, a
call that runs past its deadline has its worker killed and replaced, a worker that dies (memory
limit, a crash) is replaced; in every case the model gets a one-line message, the failure is
counted, and the step goes on. Tools are shipped to the workers by value with cloudpickle, so a
function defined in a launch script or a test works too, and a worker never imports its module.

    runner = ToolRunner([get_tool("calculator")], workers=2, timeout=5.0)
    runner.run([ToolCall("calculator", {"expression": "23 * 47"})])  # [ToolResult("1081", ok=True, ...)]
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from align import builtin_tools
from align.tools import Tool, ToolCall

_WORKER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_tool_worker.py")


@dataclass
class ToolResult:
    """What a call gave back: the text the model reads, and whether the call succeeded."""

    text: str
    ok: bool
    seconds: float = 0.0
    timed_out: bool = False


class _Worker:
    """One child process, its scratch directory and the two pipe ends the parent keeps."""

    def __init__(self, payload: bytes, memory_mb: int, max_output: int) -> None:
        self.scratch = tempfile.mkdtemp(prefix="align-tool-")
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, _WORKER_FILE, str(to_child_r), str(from_child_w), str(memory_mb), self.scratch,
                 str(max_output)], pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL,
                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.send = Connection(to_child_w, readable=False)
        self.recv = Connection(from_child_r, writable=False)
        self.ready = False
        try:
            self.send.send(("tools", payload, list(sys.path)))
        except OSError:  # the child died at once: reap it, close the pipes, remove the directory
            self.kill()
            raise

    def kill(self) -> None:
        """Kill the process now, release the pipes and remove the scratch directory."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.send.close()
        self.recv.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


def _kill_all(workers: list[_Worker]) -> None:
    """Finalizer: no child outlives a runner that was garbage-collected or an interpreter that exits."""
    for w in list(workers):
        try:
            w.kill()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


class ToolRunner:
    """`workers` tool processes; `run(calls)` runs a batch of calls, up to `workers` at a time."""

    def __init__(self, tools: list[Tool], workers: int = 2, timeout: float = 5.0, memory_mb: int = 1024,
                 max_output: int = 1000, start_timeout: float = 60.0) -> None:
        import cloudpickle

        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.tools = {t.name: t for t in tools}
        self.timeout = timeout  # seconds one call may take before its worker is killed
        self.memory_mb = memory_mb  # RLIMIT_AS per worker in MiB (0 = unlimited)
        self.max_output = max_output  # characters of a result; longer ones become an error message
        self.start_timeout = start_timeout  # seconds a fresh worker may take to load the tools
        self.num_workers = workers
        self.calls = self.errors = self.timeouts = 0  # counted over the runner's life
        # by value, not by reference: a worker would otherwise import the tool's whole module (a test
        # file or a launch script importing torch: seconds and hundreds of MB for every fresh worker)
        modules = {t.fn.__module__ for t in tools} - {builtin_tools.__name__, "__main__"}
        for name in modules:
            cloudpickle.register_pickle_by_value(sys.modules[name])
        try:
            self._payload = cloudpickle.dumps({t.name: (t.fn, t.sandboxed) for t in tools})
        finally:
            for name in modules:
                cloudpickle.unregister_pickle_by_value(sys.modules[name])
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)

    def _spawn(self) -> _Worker:
        w = _Worker(self._payload, self.memory_mb, self.max_output)
        self._workers.append(w)
        return w

    def _replace(self, w: _Worker) -> _Worker:
        w.kill()
        self._workers.remove(w)
        return self._spawn()

    def _ready(self, w: _Worker) -> _Worker:
        """`w` once it has loaded the tools (a worker that fails to start is an error of ours: raise)."""
        if not w.ready:
            if not w.recv.poll(self.start_timeout):
                raise RuntimeError(f"a tool worker did not start within {self.start_timeout} s")
            try:
                w.ready = w.recv.recv()[0] == "ready"
            except (EOFError, OSError):
                raise RuntimeError("a tool worker exited while loading the tools; its stderr says why "
                                   f"(command: {sys.executable} {_WORKER_FILE})") from None
        return w

    def run(self, calls: list[ToolCall]) -> list[ToolResult]:
        """One result per call, in order; never raises for a tool's failure."""
        results: list[ToolResult | None] = [None] * len(calls)
        pending = []
        for i, c in enumerate(calls):
            if c.error:
                results[i] = ToolResult(f"Error: {c.error}", ok=False)
            elif c.name not in self.tools:
                results[i] = ToolResult(f"Error: unknown tool {c.name!r}; the tools are {', '.join(self.tools)}", ok=False)
            else:
                pending.append(i)
        while len(self._workers) < min(self.num_workers, len(pending)):
            self._spawn()
        idle, busy = list(self._workers), {}  # busy: worker -> (call index, start time)
        while pending or busy:
            while pending and idle:
                w, i = self._ready(idle.pop()), pending.pop(0)
                try:
                    w.send.send(("call", calls[i].name, calls[i].arguments))
                    busy[w] = (i, time.monotonic())
                except OSError:  # died while idle: replace it and retry the call
                    pending.insert(0, i)
                    idle.append(self._replace(w))
            now = time.monotonic()
            ready = wait([w.recv for w in busy], timeout=max(0.0, min(t for _, t in busy.values()) + self.timeout - now))
            for w in list(busy):
                i, t0 = busy[w]
                if w.recv in ready:
                    del busy[w]
                    try:
                        kind, text = w.recv.recv()
                        results[i] = ToolResult(text if kind == "ok" else f"Error: {text}", kind == "ok", time.monotonic() - t0)
                    except (EOFError, OSError):  # e.g. killed for memory
                        results[i] = ToolResult("Error: the tool crashed (out of memory?)", False, time.monotonic() - t0)
                        w = self._replace(w)
                    idle.append(w)
                elif time.monotonic() - t0 >= self.timeout:
                    results[i] = ToolResult(f"Error: the tool did not finish within {self.timeout:g} s", False,
                                            time.monotonic() - t0, timed_out=True)
                    del busy[w]
                    idle.append(self._replace(w))
        self.calls += len(calls)
        self.errors += sum(not r.ok for r in results)
        self.timeouts += sum(r.timed_out for r in results)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """Stop every worker."""
        for w in list(self._workers):
            try:
                w.send.send(("stop",))
                w.proc.wait(timeout=1.0)
            except (OSError, subprocess.TimeoutExpired):
                pass
            w.kill()
        self._workers.clear()
