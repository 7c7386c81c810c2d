"""Local HTTP servers the workbench starts (vLLM, the gateway, MLflow, the fake server): a free port
to put one on, waiting until it answers, its URLs, and stopping its process.

    port = free_port()
    proc = subprocess.Popen([..., "--port", str(port)])
    try:
        if not wait_http_ok(f"http://127.0.0.1:{port}/health", 60, proc):
            ...                                # timed out, or proc exited first: proc.poll() says which
    finally:
        stop(proc)

Only the standard library at import (httpx when waiting): the load generator and the gateway
use it, and they must start in milliseconds where no model is.
"""

from __future__ import annotations

import socket
import subprocess
import time
from typing import Callable


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now (the OS's pick; free until someone binds it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_http_ok(url: str, timeout_s: float, proc: subprocess.Popen | None = None, *,
                 interval_s: float = 0.2, request_timeout_s: float = 5,
                 progress: Callable[[], None] | None = None, progress_every_s: float = 30) -> bool:
    """Poll ``url`` until it answers 200: True then; False after ``timeout_s`` or as soon as ``proc``
    (the server's process, when given) exits. ``progress()`` is called every ``progress_every_s``
    while waiting (a log line for long cold starts)."""
    deadline = time.monotonic() + timeout_s
    last_note = time.monotonic()
    import httpx  # here: the gateway imports this module for free_port alone

    with httpx.Client(timeout=request_timeout_s) as http:
        while True:
            if proc is not None and proc.poll() is not None:
                return False
            try:
                if http.get(url).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            now = time.monotonic()
            if now >= deadline:
                return False
            if progress is not None and now - last_note >= progress_every_s:
                progress()
                last_note = now
            time.sleep(interval_s)


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
