"""Bounded workers: run one function on one team's file in a capped child process.

A single long-lived *server* process (``python -m tusrec.scoring.worker``, started on
first use) has numpy, h5py and the scoring code imported and nothing else: it never
opens a team's file itself. For each job it forks a child, which sets its limits
(RLIMIT_AS memory cap, no core file, no file writes), runs the function and reports a
JSON result on a pipe. The server enforces the wall-time cap (kills the child) and turns
a child that dies into a reason. So each job starts in ~10-40 ms from a clean image
(it inherits no state of earlier jobs, nor of the evaluation that asked for it), and
forking a single-threaded server is safe where forking the caller (threads) is not.

Direction of trust: the caller sends jobs to the server as pickles (the caller is
trusted); results come back as JSON only, so a child subverted by a crafted file can at
most lie about its own scan, never run code in the server or the caller.

Protocol (both directions): an 8-byte big-endian length, then the payload.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib
import json
import math
import os
import pickle
import resource
import select
import signal
import struct
import subprocess
import sys
import threading
import time

_HEADER = struct.Struct(">Q")
PRELOAD = ("tusrec.scoring.score",)
MAX_RESULT_BYTES = 1 << 20  # a row of numbers and messages; anything longer is refused
CLOSE_WAIT_S = 5.0  # a server asked to stop kills and reaps its job's child in milliseconds


def _read_exact(stream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = stream.read(n - len(data))
        if not part:
            raise EOFError("worker pipe closed")
        data += part
    return data


def _send(stream, payload: bytes) -> None:
    stream.write(_HEADER.pack(len(payload)) + payload)
    stream.flush()


def _receive(stream) -> bytes:
    (n,) = _HEADER.unpack(_read_exact(stream, _HEADER.size))
    return _read_exact(stream, n)


# --------------------------------------------------------------------------- the child


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG; the
    server forks from its only thread, so "parent" is the server); elsewhere, nothing."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the server died before the request took effect
        os._exit(70)


def _child(write_fd: int, module: str, name: str, args: tuple, memory_mb: int, seconds: float) -> None:
    """In the forked child: cap, run, report JSON ['ok', value] or ['error', message]."""
    limit = int(memory_mb) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash leaves no core file
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # the worker writes no file
    cpu = int(2 * seconds) + 10  # backstop if the server dies: two threads' worth of the wall cap
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    from tusrec.data import TusrecDataError
    from tusrec.scoring.metrics import PredictionValueError
    from tusrec.scoring.policy import clean_text

    try:
        fn = getattr(importlib.import_module(module), name)
        message = ["ok", fn(*args)]
    except (TusrecDataError, PredictionValueError) as err:
        message = ["error", str(err)]
    except MemoryError:
        message = ["error", f"reading it needed more than the scoring memory cap of {memory_mb} MiB"]
    except Exception as err:  # a corrupt file makes h5py raise anything (OSError, KeyError...)
        message = ["error", f"unreadable ({type(err).__name__}: {clean_text(str(err), 300)})"]
    try:
        payload = json.dumps(message).encode()
    except (TypeError, ValueError) as err:
        payload = json.dumps(["error", f"result not serialisable ({err})"]).encode()
    with os.fdopen(write_fd, "wb") as out:
        out.write(payload)


class CallerGoneError(Exception):
    """The caller closed its end of the server's stdin (it exited or was killed)."""


def _run_job(
    module: str, name: str, args: tuple, memory_mb: int, seconds: float, caller_fd: int | None = None
) -> list:
    """In the server: fork a child for one job, wait up to ``seconds``; a JSON-able reply.

    caller_fd: the server's stdin; when the caller closes it mid-job (a Dask worker
    killed, Ctrl-C) the child is killed and reaped and CallerGoneError is raised. The child is
    reaped whatever happens (a SIGTERM to the server unwinds through here too)."""
    read_fd, write_fd = os.pipe()
    server = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            os.close(read_fd)
            _die_with_parent(server)
            _child(write_fd, module, name, args, memory_mb, seconds)
        except BaseException:
            code = 70
        finally:
            os._exit(code)
    os.close(write_fd)
    deadline = time.monotonic() + seconds
    chunks, size, timed_out = [], 0, False
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)
    if caller_fd is not None:
        poller.register(caller_fd, 0)  # POLLHUP and POLLERR are always reported
    reaped = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            events = dict(poller.poll(max(1, math.ceil(left * 1000))))
            if caller_fd is not None and events.get(caller_fd, 0) & (
                select.POLLHUP | select.POLLERR | select.POLLNVAL
            ):
                raise CallerGoneError
            if read_fd not in events:
                continue
            part = os.read(read_fd, 65536)
            if not part:
                break
            size += len(part)
            if size > MAX_RESULT_BYTES:
                timed_out = False
                chunks = None
                break
            chunks.append(part)
        if timed_out or chunks is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        reaped = True
    finally:
        os.close(read_fd)
        if not reaped:  # leaving on an exception: the child goes with the job
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    if timed_out:
        return ["failed", f"scoring stopped at its time limit of {seconds:.0f} s"]
    if chunks is None:
        return ["failed", "the scoring worker's reply was too long"]
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        label = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        hint = " (out of memory?)" if sig == signal.SIGKILL else ""
        return ["failed", f"the scoring worker was killed by {label}{hint} (memory cap {memory_mb} MiB)"]
    code = os.WEXITSTATUS(status)
    try:
        reply = json.loads(b"".join(chunks))
        if code == 0 and isinstance(reply, list) and len(reply) == 2 and reply[0] in ("ok", "error"):
            return reply
    except ValueError:
        pass
    return ["failed", f"the scoring worker exited with code {code} (memory cap {memory_mb} MiB)"]


def _terminated(signum, frame):
    raise SystemExit(0)  # unwinds through _run_job, which kills and reaps its child


def serve(stdin=None, stdout=None) -> None:
    """The server loop: one job at a time from stdin, one reply each on stdout. Ends,
    quietly, when the caller closes stdin (between jobs or during one), when it stops
    reading the replies, or on SIGTERM (WorkerServer.close); never leaves a child behind."""
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle
    signal.signal(signal.SIGTERM, _terminated)
    for module in PRELOAD:  # imported once here, so that each forked child starts warm
        importlib.import_module(module)
    try:
        caller_fd = stdin.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (tests)
        caller_fd = None
    try:
        _serve_jobs(stdin, stdout, caller_fd)
    finally:
        # A SIGTERM from WorkerServer.close arriving once the loop is over (the caller
        # closed stdin first) ends the process quietly, never inside the interpreter's
        # shutdown (where a raised SystemExit prints 'Exception ignored').
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _serve_jobs(stdin, stdout, caller_fd) -> None:
    while True:
        try:
            job = pickle.loads(_receive(stdin))
        except EOFError:
            return  # the caller is gone
        try:
            reply = _run_job(*job, caller_fd=caller_fd)
        except CallerGoneError:
            return
        except Exception as err:  # e.g. fork failed: the job fails, the server goes on
            reply = ["failed", f"the scoring worker could not run ({type(err).__name__}: {err})"]
        try:
            _send(stdout, json.dumps(reply).encode())
        except (BrokenPipeError, ValueError, OSError):  # the caller died mid-job: nobody to tell
            _quiet_exit()


def _quiet_exit() -> None:
    """Exit without the interpreter's flush of a broken stdout (which would print
    'Exception ignored ... BrokenPipeError' on the caller's terminal)."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    os._exit(0)


# --------------------------------------------------------------------------- the caller


class WorkerServer:
    """The caller's handle on the server process (started lazily, restarted if it dies)."""

    def __init__(self):
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._atexit = False

    def _spawn(self) -> subprocess.Popen:
        env = dict(os.environ)
        # The server imports this checkout's tusrec, whatever the caller's working folder.
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        return subprocess.Popen(
            [sys.executable, "-c", "from tusrec.scoring.worker import serve; serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
            start_new_session=True,  # a Ctrl-C at the terminal reaches the caller only
        )

    def start(self) -> None:
        """Start the server now if it is not running: a command that will need it calls
        this first, so that the server's imports overlap the command's own."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()

    def _start(self) -> subprocess.Popen:
        proc = self._spawn()
        if not self._atexit:
            atexit.register(self.close)  # a command waits for what it started
            self._atexit = True
        return proc

    def run(self, module: str, name: str, args: tuple, memory_mb: int, seconds: float) -> list:
        """['ok', value] | ['error', message] | ['failed', reason] for module.name(*args)."""
        with self._lock:
            for attempt in (0, 1):
                if self._proc is None or self._proc.poll() is not None:
                    self._proc = self._start()
                try:
                    _send(self._proc.stdin, pickle.dumps((module, name, args, memory_mb, seconds)))
                    reply = self._reply(seconds + 30.0)
                except (BrokenPipeError, EOFError, OSError, TimeoutError):
                    self.close()
                    if attempt:
                        return ["failed", "the scoring worker server stopped"]
                    continue
                return reply
        return ["failed", "the scoring worker server stopped"]

    def _reply(self, seconds: float) -> list:
        fd = self._proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], seconds)
        if not ready:
            raise TimeoutError
        return json.loads(_receive(self._proc.stdout))

    def close(self) -> None:
        """Stop the server and wait for it (it kills and reaps a job's child first; a
        server that does not end in CLOSE_WAIT_S is killed with its process group)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        with contextlib.suppress(OSError):
            proc.terminate()
        try:
            proc.wait(CLOSE_WAIT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the server and a job's child
            with contextlib.suppress(Exception):
                proc.wait(10)


SERVER = WorkerServer()


if __name__ == "__main__":
    serve()
