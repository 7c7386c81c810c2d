"""``workers: N``: N gateway processes accepting on one port (uvicorn's process supervisor).

    workbench gateway --config deploy/gateway.yaml      # with `workers: 4` and `limits.backend: redis`

The parent binds the socket, starts N workers (spawned: each imports the gateway afresh and
builds its app from the config the parent validated, passed in $WORKBENCH_GATEWAY_CONFIG_JSON)
and restarts a worker that dies. The kernel hands each new connection to one of the workers
blocked in accept(). SIGTERM / SIGINT stop them all, each draining its audit queue; SIGHUP
restarts the workers one by one, which re-reads the keys file. The limits live in Redis, so they
hold across the workers (the config refuses ``workers > 1`` with the in-process store). Each
worker has its own /metrics (Prometheus counters per process): scrape the workers' sum through
the audit log, or run one worker per container behind a Service and scrape each pod.
"""

from __future__ import annotations

import os

from uvicorn.supervisors import Multiprocess

from workbench.gateway.config import GatewayConfig, GatewayConfigError

ENV = "WORKBENCH_GATEWAY_CONFIG_JSON"


def worker_app():
    """uvicorn's factory in each worker process: the app from the parent's validated config."""
    from workbench.gateway.app import Gateway

    return Gateway(GatewayConfig.model_validate_json(os.environ[ENV]))


def __getattr__(name: str):
    """``http_protocol``: the client protocol configured from the parent's config (uvicorn imports
    it by name in each worker: a class made at run time cannot be pickled across the spawn)."""
    if name == "http_protocol":
        from workbench.gateway.http import GatewayHttpProtocol

        return GatewayHttpProtocol.configured(GatewayConfig.model_validate_json(os.environ[ENV]))
    raise AttributeError(name)


def serve_workers(cfg: GatewayConfig, config_factory) -> None:
    """Run ``cfg.workers`` processes under uvicorn's supervisor; returns when they have stopped.
    ``config_factory(app, host, port)`` is the server's uvicorn settings (one place for them)."""
    import redis

    try:  # here, once, rather than in every worker, restarted over and over by the supervisor
        redis.Redis.from_url(cfg.limits.redis_url, socket_connect_timeout=cfg.limits.redis_timeout_s).ping()
    except redis.exceptions.RedisError as err:
        raise GatewayConfigError(f"limits.backend redis: cannot reach {cfg.limits.redis_url}: {err}") from None
    if cfg.audit.enabled:  # the database made (and put in WAL mode) once, before the workers open it
        from workbench.gateway.auditdb import check

        check(cfg.audit)  # N first opens at once: one can find it locked while another sets it up
    os.environ[ENV] = cfg.model_dump_json()
    config = config_factory("workbench.gateway.workers:worker_app", cfg.host, cfg.port, cfg)
    config.factory = True
    config.http = "workbench.gateway.workers:http_protocol"
    config.workers = cfg.workers
    Multiprocess(config, sockets=[config.bind_socket()]).run()
