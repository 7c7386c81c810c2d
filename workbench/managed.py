"""A managed server process: start it in its own process group with its log in a file, wait until
its health URL answers, stop the whole group, and on a failed start raise with the log's last lines.

    class MyServer(ManagedServer):
        kind = "my-engine"
        def command(self) -> list[str]: ...

    with MyServer(...) as server:          # started, ready, stopped on exit
        server.base_url                    # http://127.0.0.1:<port>/v1

One home for the process handling that ``workbench.serve.VLLMServer`` (vLLM) and
``workbench.llamacpp.LlamaCppServer`` (llama.cpp) share; a subclass says only what to run
(``command``, ``env``), where it answers (``health_path``), and what it serves (``label``).
``ServerError`` and ``tail`` are ``workbench.net``'s, whose ``ServerProcess`` is the plain
start-and-wait of the gateway, Redis and the fake server; an engine server needs more: a process
group (vLLM's engine workers), PR_SET_PDEATHSIG, a start separate from the wait, progress notes
through minutes-long cold starts, and a hook once ready.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from workbench.net import LocalServer, ServerError, free_port, tail, wait_http_ok

log = logging.getLogger(__name__)


def _die_with_parent() -> None:
    """Runs in the child before exec: new process group, and SIGTERM if our process dies.

    Linux ties PR_SET_PDEATHSIG to the *thread* that started the child: a server started from a
    worker thread is killed when that thread ends (``loadtest.start_endpoints`` keeps its threads
    alive as long as the servers for this reason)."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


SECRET_FLAGS = ("--api-key",)  # vLLM's and llama-server's key to their own /v1


def redact(cmd: list[str]) -> str:
    """``cmd`` joined, the value after any of SECRET_FLAGS (or in ``--flag=value``) shown as ***."""
    out, hide = [], False
    for arg in cmd:
        flag = arg.split("=", 1)[0]
        out.append("***" if hide else f"{flag}=***" if "=" in arg and flag in SECRET_FLAGS else arg)
        hide = arg in SECRET_FLAGS
    return " ".join(out)


class ManagedServer(LocalServer):
    """One server process (and its children) in its own process group.

    Subclasses set ``kind`` (a word for logs and errors: "vLLM", "llama.cpp") and implement
    ``command()``; they may override ``env()``, ``label``, ``health_path`` and ``on_ready()``."""

    kind = "server"
    health_path = "/health"

    def __init__(self, host: str, port: int | None, log_path: Path | None, *, startup_timeout_s: float,
                 shutdown_grace_s: float, log_prefix: str):
        self.host = host
        self.port = port or free_port(host)
        self.log_path = Path(log_path) if log_path else Path(
            tempfile.mkstemp(prefix=f"{log_prefix}-", suffix=".log")[1])
        self.startup_timeout_s = startup_timeout_s
        self.shutdown_grace_s = shutdown_grace_s
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    # -- what a subclass says ------------------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        """The process environment; None: this process's."""
        return None

    @property
    def label(self) -> str:
        """What is served, for messages: a model folder or file."""
        return ""

    def on_ready(self) -> None:
        """Called once the health URL answered (vLLM renices its engine core here)."""

    def shown_command(self) -> str:
        """The command line as logs and reports may show it: a secret flag's value masked."""
        return redact(self.command())

    # -- the shared life cycle -----------------------------------------------------------------
    def start(self) -> "ManagedServer":
        if self.proc is not None:
            raise RuntimeError("server already started")
        cmd = self.command()
        log.info("starting %s: %s", self.kind, self.shown_command())
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")
        self._t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self.env(), preexec_fn=_die_with_parent,
        )
        return self

    def wait_ready(self, timeout_s: float | None = None) -> "ManagedServer":
        timeout_s = timeout_s or self.startup_timeout_s

        def note() -> None:  # a vLLM cold start on 2 cores takes minutes
            log.info("waiting for %s (%s) ... %.0f s", self.kind, self.label, time.perf_counter() - self._t0)

        ready = wait_http_ok(f"{self.root_url}{self.health_path}", timeout_s, self.proc, interval_s=0.5,
                             progress=note)
        if not ready:
            code = self.proc.poll()
            self.stop()
            why = (f"{self.kind} exited with code {code} while starting {self.label}" if code is not None
                   else f"{self.kind} not ready after {timeout_s:.0f} s ({self.label})")
            raise ServerError(f"{why}.\n--- last lines of {self.log_path} ---\n{tail(self.log_path)}")
        self.startup_s = time.perf_counter() - self._t0
        log.info("%s %s ready at %s after %.1f s", self.kind, self.label, self.base_url, self.startup_s)
        self.on_ready()
        return self

    def stop(self) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after the grace period."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # setsid made the server its own group leader
        for sig, wait in ((signal.SIGTERM, self.shutdown_grace_s), (signal.SIGKILL, 10)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            if not _group_alive(pgid):
                break
            time.sleep(0.5)
            if not _group_alive(pgid):
                break
        self.proc = None
        self._log_file.close()

    def __enter__(self):
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
