"""Local servers the workbench starts (vLLM, the gateway, MLflow, Redis, the fake server): a free
port to put one on, waiting until it answers, its URLs, and stopping its process; ``ServerProcess``
does all four for a command::

    port = free_port()
    with ServerProcess([sys.executable, "-m", "some.server", "--port", str(port)], port,
                       log_path=tmp / "server.log") as server:   # waits for GET /health: 200
        httpx.get(server.root_url + "/v1/models")
    # raises ServerError (with the log's last lines) if it exits or does not answer in time

Only the standard library at import (httpx when waiting): the load generator and the gateway
use it, and they must start in milliseconds where no model is.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections import deque
from pathlib import Path
from typing import Callable, Sequence


class ServerError(RuntimeError):
    """A server did not come up, or died; the message carries the server's own last log lines."""


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a server's log, for an error message."""
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except OSError:
        return "(no server log)"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now (the OS's pick; free until someone binds it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(ready: Callable[[], bool], timeout_s: float, proc: subprocess.Popen | None = None, *,
               interval_s: float = 0.2, progress: Callable[[], None] | None = None,
               progress_every_s: float = 30) -> bool:
    """Call ``ready()`` until it is true: True then; False after ``timeout_s`` or as soon as ``proc``
    (the server's process, when given) exits. ``progress()`` is called every ``progress_every_s``
    while waiting (a log line for long cold starts)."""
    deadline = time.monotonic() + timeout_s
    last_note = time.monotonic()
    while True:
        if proc is not None and proc.poll() is not None:
            return False
        if ready():
            return True
        now = time.monotonic()
        if now >= deadline:
            return False
        if progress is not None and now - last_note >= progress_every_s:
            progress()
            last_note = now
        time.sleep(interval_s)


def wait_http_ok(url: str, timeout_s: float, proc: subprocess.Popen | None = None, *,
                 interval_s: float = 0.2, request_timeout_s: float = 5,
                 progress: Callable[[], None] | None = None, progress_every_s: float = 30) -> bool:
    """``wait_until`` GET ``url`` answers 200."""
    import httpx  # here: the gateway imports this module for free_port alone

    with httpx.Client(timeout=request_timeout_s) as http:
        def ok() -> bool:
            try:
                return http.get(url).status_code == 200
            except httpx.HTTPError:
                return False

        return wait_until(ok, timeout_s, proc, interval_s=interval_s, progress=progress,
                          progress_every_s=progress_every_s)


def stop(proc: subprocess.Popen, grace_s: float = 10) -> int | None:
    """SIGTERM ``proc``, SIGKILL it if it is still running after ``grace_s``, and reap it. Returns
    its exit code (None only if it outlived the SIGKILL wait)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
    return proc.poll()


class LocalServer:
    """The URLs of an OpenAI-compatible server on ``self.host``:``self.port`` (a mixin)."""

    host: str
    port: int

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI API's root, ``<root_url>/v1``."""
        return f"{self.root_url}/v1"


def redis_answers(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a Redis server on ``host:port`` answers PING (the raw protocol: no client library)."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def redis_server(exe: str, port: int, workdir: Path, host: str = "127.0.0.1") -> "ServerProcess":
    """A redis-server of our own on ``port`` (no persistence; files in ``workdir``), ready when it
    answers PING: the gateway's shared limits in the tests."""
    argv = [exe, "--port", str(port), "--bind", host, "--save", "", "--appendonly", "no", "--dir", str(workdir)]
    return ServerProcess(argv, port, host=host, name="redis-server", ready=lambda: redis_answers(port, host),
                         timeout_s=10, interval_s=0.05, log_path=Path(workdir) / "redis.log")


class ServerProcess(LocalServer):
    """A server's process: started on enter, ready when ``ready()`` is true (default: GET
    ``ready_path`` answers 200), stopped on exit (SIGTERM, SIGKILL after ``grace_s``). Its output
    goes to ``log_path`` (default: stdout discarded, stderr inherited). A process that exits or does
    not answer within ``timeout_s`` is stopped and raises ServerError with its log's tail."""

    def __init__(self, argv: Sequence[str], port: int, *, host: str = "127.0.0.1", name: str | None = None,
                 ready_path: str = "/health", ready: Callable[[], bool] | None = None, timeout_s: float = 60,
                 interval_s: float = 0.1, grace_s: float = 10, cwd: str | Path | None = None,
                 env: dict[str, str] | None = None, log_path: Path | None = None, preexec_fn=None):
        self.argv, self.host, self.port = [str(a) for a in argv], host, port
        self.name = name or Path(self.argv[0]).name
        self.ready_path, self.ready, self.timeout_s, self.interval_s = ready_path, ready, timeout_s, interval_s
        self.grace_s, self.cwd, self.env, self.log_path, self.preexec_fn = grace_s, cwd, env, log_path, preexec_fn
        self.proc: subprocess.Popen | None = None

    def __enter__(self):
        out = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT if self.log_path else None,
                                         preexec_fn=self.preexec_fn)
        finally:
            if self.log_path:
                out.close()  # the child has its own copy
        if self.ready is not None:
            up = wait_until(self.ready, self.timeout_s, self.proc, interval_s=self.interval_s)
        else:
            up = wait_http_ok(self.root_url + self.ready_path, self.timeout_s, self.proc, interval_s=self.interval_s)
        if up:
            return self
        code = self.proc.poll()
        self.stop()
        why = f"exited with code {code}" if code is not None else f"did not answer within {self.timeout_s:g} s"
        log = f":\n{tail(self.log_path)}" if self.log_path else ""
        raise ServerError(f"{self.name} on port {self.port} {why}{log}")

    def stop(self) -> int | None:
        return stop(self.proc, self.grace_s) if self.proc is not None else None

    def __exit__(self, *exc) -> None:
        self.stop()
