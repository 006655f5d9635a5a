"""Training runs forked from a process that has already imported torch, torchvision and the engine.

``python -m vit.engine`` spends seconds on imports before its first step (torch, then torchvision, which pulls in
``torch._dynamo``): on a CPU that is as long as a short fine-tune. A pipeline of many stages instead forks each
run from a small server, ``python -m tasks.prefork``, that paid those imports once; it starts with the first
run and lives as long as the process that started it. Each run is still a process of its own, started as
``python -m vit.engine ARGS`` would be: its own environment, its output in a log file, its exit code
(``ForkedRun`` answers like ``subprocess.Popen``), SIGTERM to checkpoint and stop. It gets SIGTERM when the server
goes, and the server goes when the process that started it does (its stdin closes, or its parent-death signal).

Protocol (JSON lines): the client writes ``{"id", "args", "env", "log", "cwd"}`` to the server's stdin; the
server answers ``{"id", "pid"}`` once it has forked, and ``{"pid", "exit"}`` when that child ends (the exit code,
or minus the signal).

Hand-made because the stdlib's ``multiprocessing`` forkserver runs Python callables in children it owns: it gives no
per-run environment (threads are read from ``OMP_NUM_THREADS`` at import), no log file as stdout/stderr, no exit
code or SIGTERM semantics of a ``python -m vit.engine`` process, which the launcher and its tests rely on.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import IO, Any


def die_with_parent() -> None:
    """Linux: SIGTERM this process when its parent dies, even by SIGKILL, so no orphan keeps training (the engine
    checkpoints on SIGTERM) while a re-run resumes from the same checkpoints. Elsewhere: nothing."""
    import ctypes

    with contextlib.suppress(OSError):  # not Linux: no parent-death signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ForkServerGone(RuntimeError):
    """The fork server died; runs it had forked were stopped by their parent-death signal."""


class _Client:
    """The orchestrator's side: starts the server, sends requests, and routes its answers."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tasks.prefork"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            preexec_fn=die_with_parent,
        )
        self.lock = threading.Lock()  # one writer at a time
        self.changed = threading.Condition()
        self.pids: dict[int, int] = {}  # request id -> pid
        self.exits: dict[int, int] = {}  # pid -> exit code
        self.alive = True
        self.ids = itertools.count()
        threading.Thread(target=self._read, args=(self.process.stdout,), name="vit-prefork", daemon=True).start()
        atexit.register(self.close)

    def close(self) -> None:
        """Close the server's stdin (it exits: no new runs) and reap it."""
        with contextlib.suppress(OSError, ValueError), self.lock:
            assert self.process.stdin is not None
            self.process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)

    def _read(self, stream: IO[bytes]) -> None:
        for line in stream:
            message = json.loads(line)
            with self.changed:
                if "exit" in message:
                    self.exits[message["pid"]] = message["exit"]
                else:
                    self.pids[message["id"]] = message["pid"]
                self.changed.notify_all()
        with self.changed:
            self.alive = False
            self.changed.notify_all()

    def fork(self, args: list[str], env: dict[str, str], log: Path) -> int:
        request_id = next(self.ids)
        request = {"id": request_id, "args": args, "env": env, "log": str(log), "cwd": os.getcwd()}
        with self.lock:
            assert self.process.stdin is not None
            try:
                self.process.stdin.write(json.dumps(request).encode() + b"\n")
                self.process.stdin.flush()
            except (BrokenPipeError, ValueError):  # died since the last run; the next call starts a new one
                self.alive = False
                raise ForkServerGone("the training fork server had exited") from None
        with self.changed:
            self.changed.wait_for(lambda: request_id in self.pids or not self.alive)
            if request_id not in self.pids:
                raise ForkServerGone("the training fork server exited before it started the run")
            return self.pids.pop(request_id)

    def wait(self, pid: int, timeout: float | None) -> int | None:
        with self.changed:
            self.changed.wait_for(lambda: pid in self.exits or not self.alive, timeout)
            if pid in self.exits:
                return self.exits[pid]
            if not self.alive:
                raise ForkServerGone(f"the training fork server exited while run {pid} was going")
            return None


_client: _Client | None = None
_client_lock = threading.Lock()


def _server() -> _Client:
    """This process's fork server, started on first use and again if the last one died."""
    global _client
    with _client_lock:
        if _client is None or not _client.alive:
            _client = _Client()
        return _client


class ForkedRun:
    """One ``python -m vit.engine ARGS`` run forked from the server; the part of ``subprocess.Popen`` that
    ``tasks.launch`` uses. ``returncode`` is the exit code, or minus the signal that ended the run."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.args = args
        self._server = _server()
        self.pid = self._server.fork(args, env, log)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode if self.returncode is not None else self._wait(0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._wait(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(["python", "-m", "vit.engine", *self.args], timeout or 0.0)
        return code

    def _wait(self, timeout: float | None) -> int | None:
        if self.returncode is None:
            self.returncode = self._server.wait(self.pid, timeout)
        return self.returncode

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: signal.Signals) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


# --------------------------------------------------------------------------------------------------------------
# The server process


_protocol_fd = 1  # the server's answers; ``serve`` moves them off fd 1, where a stray print would corrupt them


def _reply(message: dict[str, Any]) -> None:
    os.write(_protocol_fd, json.dumps(message).encode() + b"\n")


def _run_child(request: dict[str, Any]) -> None:
    """In the forked child: become ``python -m vit.engine ARGS`` with the request's environment, working folder and
    output file, then exit with its code. OpenMP read ``OMP_NUM_THREADS`` when the server imported torch, so the
    thread count is set here."""
    code = 1
    try:
        os.close(_protocol_fd)  # the client must see EOF when the server dies, whatever its runs hold open
        die_with_parent()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        output = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        stdin = os.open(os.devnull, os.O_RDONLY)
        for fd, target in ((stdin, 0), (output, 1), (output, 2)):
            os.dup2(fd, target)
        os.close(output)
        os.close(stdin)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - fd 1 for the rest of the process
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        threads = request["env"].get("OMP_NUM_THREADS", "")
        if threads.isdigit():
            import torch

            torch.set_num_threads(int(threads))
        from vit.engine.__main__ import main

        code = main(request["args"])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    """Import once, then fork a run per request until stdin closes; report every child's exit."""
    global _protocol_fd
    _protocol_fd = os.dup(1)
    os.dup2(2, 1)  # anything printed from here on (an import's notice) goes to stderr, not into the protocol

    import torchvision.io  # noqa: F401 - the imports every run would otherwise pay

    import vit.data.dataset  # noqa: F401
    import vit.data.transforms  # noqa: F401
    import vit.engine.__main__  # noqa: F401

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the runs (same process group); they stop
    pending = b""
    children: set[int] = set()
    while True:
        ready, _, _ = select.select([0], [], [], 0.05)
        if ready:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                return  # the client is gone; the children get SIGTERM from their parent-death signal
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _run_child(request)
                children.add(pid)
                _reply({"id": request["id"], "pid": pid})
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            _reply({"pid": pid, "exit": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    serve()
