"""Run the gateway under uvicorn (uvloop + httptools): in the foreground, or in a thread (tests).

    workbench gateway --config deploy/gateway.yaml --port 8080

    with GatewayServer(cfg) as gw:                  # in code: a free port, ready on enter
        openai.OpenAI(base_url=gw.base_url, api_key=key)
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

import uvicorn

from workbench.gateway.app import Gateway
from workbench.gateway.config import GatewayConfig

log = logging.getLogger(__name__)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def uvicorn_config(app: Gateway, host: str, port: int) -> uvicorn.Config:
    # No access log (the audit log is the record), no server header; h11 is not on the hot path.
    return uvicorn.Config(app, host=host, port=port, loop="uvloop", http="httptools", lifespan="on",
                          access_log=False, server_header=False, date_header=False,
                          backlog=4096, timeout_keep_alive=30, log_level="warning")


def serve(cfg: GatewayConfig) -> None:
    if cfg.workers > 1:  # N processes on one port, limits in Redis (workers.py)
        from workbench.gateway.workers import serve_workers

        print(f"gateway on http://{cfg.host}:{cfg.port}/v1  workers: {cfg.workers}  (Ctrl-C stops them)")
        return serve_workers(cfg, uvicorn_config)
    app = Gateway(cfg)
    print(f"gateway on http://{cfg.host}:{cfg.port}/v1  models: {', '.join(sorted(app.routes)) or '(none)'}"
          f"  keys: {len(app.keys)}  (Ctrl-C stops it)")
    uvicorn.Server(uvicorn_config(app, cfg.host, cfg.port)).run()


class GatewayServer:
    """The gateway on a free port in a background thread of this process."""

    def __init__(self, cfg: GatewayConfig, port: int | None = None):
        self.cfg = cfg
        self.host = cfg.host
        self.port = port or _free_port(self.host)
        self.app = Gateway(cfg)
        self._server = uvicorn.Server(uvicorn_config(self.app, self.host, self.port))

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def __enter__(self) -> "GatewayServer":
        self._thread = threading.Thread(target=self._run, name="gateway", daemon=True)
        self._thread.start()
        for _ in range(500):
            if self._server.started:
                return self
            if not self._thread.is_alive():
                break
            threading.Event().wait(0.02)
        raise RuntimeError("gateway did not start")

    def _run(self) -> None:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(self._server.serve())

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
