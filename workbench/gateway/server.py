"""Run the gateway under uvicorn (uvloop + httptools): in the foreground, or in a thread (tests).

    workbench gateway --config deploy/gateway.yaml --port 8080

    with GatewayServer(cfg) as gw:                  # in code: a free port, ready on enter
        openai.OpenAI(base_url=gw.base_url, api_key=key)
"""

from __future__ import annotations

import asyncio
import logging
import threading

import uvicorn

from workbench.gateway.app import Gateway
from workbench.gateway.config import GatewayConfig
from workbench.gateway.http import GatewayHttpProtocol, raise_fd_limit
from workbench.net import LocalServer, free_port

log = logging.getLogger(__name__)


def uvicorn_config(app: Gateway | str, host: str, port: int,
                   cfg: GatewayConfig | None = None) -> uvicorn.Config:
    """``app``: the app, or (workers) the import string of its factory, then with ``cfg``."""
    # No access log (the audit log is the record), no server header; h11 is not on the hot path.
    # httptools with the gateway's timeouts, head limit and connection cap (http.py).
    cfg = cfg or app.cfg
    h = cfg.http
    return uvicorn.Config(app, host=host, port=port, loop="uvloop",
                          http=GatewayHttpProtocol.configured(cfg), ws="none", lifespan="on",
                          access_log=False, server_header=False, date_header=False, backlog=4096,
                          timeout_keep_alive=h.keep_alive_s, timeout_graceful_shutdown=h.graceful_shutdown_s,
                          # X-Forwarded-* read only from the configured proxies; none: no middleware
                          proxy_headers=bool(h.trusted_proxies), forwarded_allow_ips=list(h.trusted_proxies) or None,
                          log_level="warning")


def serve(cfg: GatewayConfig) -> None:
    raise_fd_limit(cfg.http.max_client_connections)  # workers inherit it
    if cfg.workers > 1:  # N processes on one port, limits in Redis (workers.py)
        from workbench.gateway.workers import serve_workers

        print(f"gateway on http://{cfg.host}:{cfg.port}/v1  workers: {cfg.workers}  (Ctrl-C stops them)")
        return serve_workers(cfg, uvicorn_config)
    app = Gateway(cfg)
    print(f"gateway on http://{cfg.host}:{cfg.port}/v1  models: {', '.join(sorted(app.routes)) or '(none)'}"
          f"  keys: {len(app.keys)}  (Ctrl-C stops it)")
    try:
        uvicorn.Server(uvicorn_config(app, cfg.host, cfg.port)).run()
    finally:  # a forced exit (a second Ctrl-C) skips the app's shutdown: still drain the audit log
        if app.audit:
            app.audit.close()


class GatewayServer(LocalServer):
    """The gateway on a free port in a background thread of this process."""

    def __init__(self, cfg: GatewayConfig, port: int | None = None):
        self.cfg = cfg
        self.host = cfg.host
        self.port = port or free_port(self.host)
        self.app = Gateway(cfg)
        self._server = uvicorn.Server(uvicorn_config(self.app, self.host, self.port))

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
