"""The child side of `align.sandbox`: one process that runs tool calls, one at a time.

Started as `python _tool_worker.py READ_FD WRITE_FD MEMORY_MB SCRATCH_DIR MAX_OUTPUT` (a file path, so
that starting it imports neither the parent's `__main__` nor the project's heavy modules).

    parent -> child   ("tools", pickled {name: (fn, sandboxed)}, sys.path)  once, first
                      ("call", name, arguments)   or   ("stop",)
    child  -> parent  ("ready",) once the tools are loaded, then per call ("ok", text) or ("error", text)

The guard (PEP 578 audit hook, on only while a sandboxed tool runs) refuses sockets, new processes,
ctypes, and file access outside the scratch directory (reads also from the Python installation, for
imports). It stops a model's mistakes, not an attacker: a hook in the same interpreter is not a
security boundary, so tools of untrusted models belong in a container. RLIMIT_AS turns a runaway
allocation into MemoryError; the parent kills this process at a call's deadline.
"""
from __future__ import annotations

import os
import resource
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    sys.path.pop(0)  # keep this package's modules from shadowing top-level names

from multiprocessing.connection import Connection  # noqa: E402

# object.__getattr__: frame and code attributes (tb_frame, f_back, gi_frame, ...), the way from the
# tool's code to this module's frames and the guard's switch; sqlite3 opens files without an "open" event
_DENIED = ("socket.", "subprocess.", "ctypes.", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
           "os.system", "os.kill", "os.forkpty", "pty.", "gc.get_", "sys._getframe", "sys._current_frames",
           "sys.setprofile", "sys.settrace", "urllib.", "http.", "ftplib.", "smtplib.", "webbrowser.",
           "object.__getattr__", "sqlite3.", "os.putenv", "os.unsetenv")
_PATH_EVENTS = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link",
                "os.symlink", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "os.chdir",
                "os.listdir", "os.scandir")
_READ_ONLY_OK = ("open", "os.listdir", "os.scandir")


def _make_guard(scratch: str):
    """An audit hook and the switch that turns it on for sandboxed calls (kept in a closure). The
    functions the hook calls are bound here, so a tool replacing os.path.realpath changes nothing."""
    scratch = os.path.realpath(scratch)
    readable = tuple({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})
    state = {"on": False}
    realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    environ, saved = os.environ, {}
    quiet_env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch}

    def inside(path, roots) -> bool:
        if type(path) is int:  # an open file descriptor: already allowed when it was opened
            return True
        p = realpath(fsdecode(path))
        for r in roots:
            if p == r or p.startswith(r + sep):
                return True
        return False

    def hook(event: str, args: tuple) -> None:
        if not state["on"]:
            return
        if event.startswith(_DENIED):
            raise PermissionError(f"not allowed in this tool: {event}")
        if event == "open":
            path, mode, flags = args
            writes = (mode and any(c in mode for c in "wax+")) or (flags and flags & write_flags)
            roots = (scratch,) if writes else (scratch,) + readable
            if path is not None and not inside(path, roots):
                raise PermissionError(f"not allowed in this tool: opening {path!r} (files live in the working directory)")
        elif event in _PATH_EVENTS:
            roots = (scratch,) + readable if event in _READ_ONLY_OK else (scratch,)
            for path in args:  # rename / link / symlink: the destination too
                if isinstance(path, (str, bytes, os.PathLike)) and not inside(path, roots):
                    raise PermissionError(f"not allowed in this tool: {event} on {path!r}")

    def switch(on: bool) -> None:
        # the environment (tokens, keys) is hidden from sandboxed tools and restored after them
        if on:
            saved.clear()
            saved.update(environ)
            environ.clear()
            environ.update(quiet_env)
            state["on"] = True
        else:
            state["on"] = False
            if saved:
                environ.clear()
                environ.update(saved)
                saved.clear()

    return hook, switch


def _empty(scratch: str) -> None:
    """Remove what a call left in the scratch directory: episodes never see each other's files."""
    import shutil

    for entry in os.scandir(scratch):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            os.unlink(entry.path)


def main() -> None:
    read_fd, write_fd, memory_mb, scratch, max_output = sys.argv[1:6]
    recv, send = Connection(int(read_fd), writable=False), Connection(int(write_fd), readable=False)
    if int(memory_mb) > 0:
        limit = int(memory_mb) * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.chdir(scratch)
    hook, switch = _make_guard(scratch)
    msg = recv.recv()
    sys.path[:0] = [p for p in msg[2] if p not in sys.path]
    import pickle

    tools = pickle.loads(msg[1])  # cloudpickle's output loads with pickle (cloudpickle importable)
    sys.addaudithook(hook)
    send.send(("ready",))
    while True:
        msg = recv.recv()
        if msg[0] == "stop":
            return
        _, name, arguments = msg
        fn, sandboxed = tools[name]
        try:
            switch(sandboxed)
            try:
                text = str(fn(**arguments))
            finally:
                switch(False)
                if sandboxed:
                    os.chdir(scratch)
                    _empty(scratch)
            if len(text) > int(max_output):
                send.send(("error", f"the tool's output is too long ({len(text)} characters; the limit is {max_output})"))
            else:
                send.send(("ok", text))
        except BaseException as exc:  # noqa: BLE001 - every failure is the model's message, not ours
            switch(False)
            if isinstance(exc, KeyboardInterrupt):
                raise
            message = " ".join(str(exc).split())[:300]  # one line for the model
            send.send(("error", f"{type(exc).__name__}: {message}"))


if __name__ == "__main__":
    main()
