"""A small pool of math-verify processes with a hard per-item deadline.

Why processes, and why not `concurrent.futures.ProcessPoolExecutor`:
- math-verify's timeouts use `signal.alarm`, which works only in a process's main thread; reward
  functions run in worker threads and Ray actors. Pure-Python big-integer work also holds the GIL,
  so no thread can stop it: only killing a process bounds the time (ENVIRONMENT.md).
- An executor cannot kill one stuck task: its workers are anonymous, and a killed worker breaks the
  whole pool. Here every worker is our own process with its own pipe, so a stuck one is killed and
  replaced while the others go on.

Why `subprocess` (fork + exec of a fresh interpreter) rather than multiprocessing's fork,
forkserver or spawn start methods: `fork` of a parent that runs threads (Ray, torch, the reward
runner) can deadlock the child on a lock some other thread held; `spawn` and `forkserver` re-import
the parent's `__main__` (a training script without a main guard would run again in every worker,
and under Ray the main module is Ray's worker script). Exec'ing `_math_worker.py` by path starts a
clean interpreter that imports only math-verify, and is safe from any thread of any process.
Measured on the 2-core development machine: one worker ready (sympy imported, parser warmed up) in
0.3-0.6 s, two at once in 0.6-1.2 s; `spawn` took 1.5 s for two; `forkserver` with math-verify
preloaded replaces a worker in about 0.1 s, the only real saving, and it is paid only after a kill
(rare: math-verify's own alarm inside the worker stops most slow inputs without one).
"""
from __future__ import annotations

import collections
import os
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

_WORKER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_math_worker.py")

TIMEOUT = "timeout"  # outcome of an item whose worker missed its deadline and was killed


class _Worker:
    """One child process and the two pipe ends the parent keeps."""

    def __init__(self, memory_mb: int) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, _WORKER_FILE, str(to_child_r), str(from_child_w), str(memory_mb)],
                pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL,
                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
        except BaseException:
            os.close(to_child_w)
            os.close(from_child_r)
            raise
        finally:
            os.close(to_child_r)  # the child's ends: only the child keeps them open
            os.close(from_child_w)
        self.send_conn = Connection(to_child_w, readable=False)
        self.recv_conn = Connection(from_child_r, writable=False)
        self.started = time.monotonic()
        self.ready = False  # set when the child has imported math-verify and said so

    def kill(self) -> None:
        """Kill the process now and release the pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.send_conn.close()
        self.recv_conn.close()

    def stop(self, grace: float = 1.0) -> None:
        """Ask the child to exit, and kill it if it does not within `grace` seconds."""
        try:
            self.send_conn.send(("stop",))
            self.proc.wait(timeout=grace)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


def _kill_all(workers: list[_Worker]) -> None:
    """Finalizer: no child outlives a pool that was garbage-collected or an interpreter that exits."""
    for worker in list(workers):
        try:
            worker.kill()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


@dataclass
class _Slot:
    """A worker checked out by one call, and what it is working on for that call."""

    worker: _Worker
    chunk: list[int]  # indices (into the call's items) sent and not yet answered, in order
    deadline: float  # monotonic time by which the next message must arrive


class MathVerifyPool:
    """`num_workers` math-verify processes shared by any number of threads.

    `score(items, options, timeout)` returns, per (gold, completion) item, what the child answered
    (1.0 / 0.0 / None / ("error", msg)) or `TIMEOUT` when the item ran past `timeout` seconds of
    wall time and its worker was killed and replaced. Workers start lazily on the first call (or on
    `start()`); each call checks out the idle workers it can use, so concurrent calls share them
    (a call may first wait for a worker that another call holds). A kill costs a fresh worker's
    start (about 0.3-0.6 s, in the background); the call's other items go on meanwhile.

    Example:
        >>> pool = MathVerifyPool(num_workers=2)
        >>> pool.score([("18", "\\\\boxed{18}")], OPTIONS, timeout=5.0)   # doctest: +SKIP
        [1.0]
        >>> pool.close()
    """

    def __init__(self, num_workers: int = 2, memory_mb: int = 2048, start_timeout: float = 120.0,
                 chunk_size: int = 8) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers  # processes kept alive
        self.memory_mb = memory_mb  # RLIMIT_AS per child in MiB (0 = unlimited)
        self.start_timeout = start_timeout  # seconds a fresh child may take to import math-verify
        self.chunk_size = chunk_size  # items per message: amortises the pipe round trip
        self.kills = 0  # workers killed at a deadline (or found dead) and replaced
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._all: list[_Worker] = []  # every live child, for the finalizer
        self._started = False
        self._closed = False
        self._finalizer = weakref.finalize(self, _kill_all, self._all)

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> "MathVerifyPool":
        """Start the children now (they import math-verify in the background)."""
        with self._cond:
            if self._closed:
                raise RuntimeError("MathVerifyPool is closed")
            if not self._started:
                self._started = True
                for _ in range(self.num_workers):
                    self._idle.append(self._spawn())
        return self

    def close(self) -> None:
        """Stop every child; calls made afterwards raise."""
        with self._cond:
            self._closed = True
            workers, self._idle = list(self._all), []
        for worker in workers:
            worker.stop()
        with self._cond:
            self._all.clear()
            self._cond.notify_all()

    def __enter__(self) -> "MathVerifyPool":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _spawn(self) -> _Worker:
        worker = _Worker(self.memory_mb)
        self._all.append(worker)
        return worker

    def _replace(self, worker: _Worker) -> _Worker:
        """Kill `worker` and start its replacement (which becomes ready in the background)."""
        worker.kill()
        with self._cond:
            self.kills += 1
            if worker in self._all:
                self._all.remove(worker)
            if self._closed:
                raise RuntimeError("MathVerifyPool was closed during a call")
            return self._spawn()

    def _checkout(self, wanted: int) -> list[_Worker]:
        self.start()
        with self._cond:
            while not self._idle:
                if self._closed:
                    raise RuntimeError("MathVerifyPool is closed")
                self._cond.wait()
            for worker in self._idle:  # learn which starting workers have said "ready"
                try:
                    if not worker.ready and worker.recv_conn.poll():
                        worker.ready = worker.recv_conn.recv()[0] == "ready"
                except (EOFError, OSError):
                    pass  # died while starting: the call that gets it reports that
            # Ready workers first, so a call is not held up by a child still starting.
            self._idle.sort(key=lambda w: not w.ready)
            taken, self._idle = self._idle[:wanted], self._idle[wanted:]
            return taken

    def _checkout_ready(self, wanted: int) -> list[_Worker]:
        """Up to `wanted` idle workers already known to be ready, without waiting."""
        with self._cond:
            ready = [w for w in self._idle if w.ready][:wanted]
            for worker in ready:
                self._idle.remove(worker)
            return ready

    def _checkin(self, workers: list[_Worker]) -> None:
        with self._cond:
            if self._closed:
                for worker in workers:
                    worker.kill()
                    if worker in self._all:
                        self._all.remove(worker)
            else:
                self._idle.extend(workers)
            self._cond.notify_all()

    # ----------------------------------------------------------------- scoring

    def score(self, items: list[tuple[str, str]], options: dict, timeout: float) -> list:
        """Per item: the child's answer, or `TIMEOUT` after `timeout` seconds on that one item."""
        if not items:
            return []
        results: list = [None] * len(items)
        pending = collections.deque(range(len(items)))
        wanted = min(self.num_workers, -(-len(items) // self.chunk_size))
        slots = [_Slot(w, [], 0.0) for w in self._checkout(wanted)]
        try:
            while pending or any(s.chunk for s in slots):
                if pending and not any(s.worker.ready and not s.chunk for s in slots):
                    # e.g. a kill left this call with a starting worker: borrow a ready one.
                    slots.extend(_Slot(w, [], 0.0) for w in self._checkout_ready(1))
                self._dispatch(slots, pending, items, options, timeout)
                self._collect(slots, pending, results, timeout)
        finally:
            self._checkin([s.worker for s in slots])
        return results

    def _dispatch(self, slots: list[_Slot], pending: collections.deque, items, options,
                  timeout: float) -> None:
        """Send the next chunk of items to every ready, idle worker of this call."""
        for slot in slots:
            if slot.chunk:
                continue
            if not slot.worker.ready:  # wait for its "ready" message, up to the start timeout
                slot.deadline = slot.worker.started + self.start_timeout
                continue
            if not pending:
                continue
            chunk = [pending.popleft() for _ in range(min(self.chunk_size, len(pending)))]
            try:
                slot.worker.send_conn.send(("score", [items[i] for i in chunk], options))
            except OSError:  # the child died while idle: start another, retry these items
                pending.extendleft(reversed(chunk))
                slot.worker = self._replace(slot.worker)
                continue
            slot.chunk = chunk
            slot.deadline = time.monotonic() + timeout

    def _collect(self, slots: list[_Slot], pending: collections.deque, results: list,
                 timeout: float) -> None:
        """Wait for the next message (or the earliest deadline) and act on it."""
        watched = [s for s in slots if s.chunk or not s.worker.ready]
        if not watched:
            return
        now = time.monotonic()
        earliest = min(s.deadline for s in watched)
        ready = wait([s.worker.recv_conn for s in watched], timeout=max(0.0, earliest - now))
        for slot in watched:
            if slot.worker.recv_conn in ready:
                self._receive(slot, pending, results, timeout)
        now = time.monotonic()
        for slot in watched:
            if slot.deadline <= now and (slot.chunk or not slot.worker.ready):
                self._expire(slot, pending, results)

    def _receive(self, slot: _Slot, pending: collections.deque, results: list,
                 timeout: float) -> None:
        """Read every message waiting on one worker's pipe."""
        conn = slot.worker.recv_conn
        try:
            while conn.poll():
                msg = conn.recv()
                if msg[0] == "ready":
                    slot.worker.ready = True
                else:
                    results[slot.chunk.pop(0)] = msg[1]
                slot.deadline = time.monotonic() + timeout
        except (EOFError, OSError):  # the child died (e.g. a crash inside sympy or a signal)
            if not slot.worker.ready:
                slot.worker = self._replace(slot.worker)
                raise RuntimeError(
                    "a math-verify worker process exited while starting; its stderr says why "
                    f"(command: {sys.executable} {_WORKER_FILE})") from None
            if slot.chunk:
                results[slot.chunk.pop(0)] = ("error", "worker process died")
            pending.extendleft(reversed(slot.chunk))
            slot.chunk = []
            slot.worker = self._replace(slot.worker)

    def _expire(self, slot: _Slot, pending: collections.deque, results: list) -> None:
        """A deadline passed: kill the worker, mark its current item, requeue the rest."""
        if not slot.worker.ready:
            slot.worker = self._replace(slot.worker)
            raise RuntimeError(f"a math-verify worker did not start within {self.start_timeout} s")
        results[slot.chunk.pop(0)] = TIMEOUT
        pending.extendleft(reversed(slot.chunk))
        slot.chunk = []
        slot.worker = self._replace(slot.worker)
