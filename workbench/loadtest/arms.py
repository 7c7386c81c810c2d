"""Arms: what a load test measures, and how to reach (and, if managed, start and stop) it.

An arm is a name and an OpenAI-compatible endpoint (``Arm``). These kinds come in here:

- a managed vLLM server per variant (``workbench/serve.py``; ``server_config`` is its config),
- the gateway as its own process in front of a variant's server (``<variant>@gateway``),
- any URL (``loadtest.base_url``, with its ``api_key``): nothing to start or stop,
- ``loadtest.arms`` beside the variants: ``vllm`` (a variant under the arm's name), ``llamacpp``
  (the GGUF on a managed llama.cpp server, workbench/llamacpp.py) and ``url`` (any endpoint, its
  key read from the environment variable ``api_key_env`` names; the key stays in the ``Target``
  in memory, and only the variable's name reaches the server info, reports and logs).

``open_arms`` brings them all up on one ``contextlib.ExitStack`` (servers in parallel with
``parallel_start``) and says which variants could not be served; the stack stops them. Imports no
vLLM: a managed server is a subprocess.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from workbench import variants
from workbench.config import LlamaCppArm, LoadtestConfig, UrlArm, VllmArm, deep_merge
from workbench.loadgen.client import Target

log = logging.getLogger(__name__)
GATEWAY_SUFFIX = "@gateway"  # loadtest.gateway_arms: "<variant>@gateway", the variant's server through the gateway
ALIVE_TIMEOUT_S = 30.0  # how long check_alive waits for a server's /health


@dataclass(frozen=True)
class Arm:
    """One configuration under test: a name (a variant, ``<variant>@gateway``, a serving
    configuration), its endpoint, its server's root URL for /metrics, and the server's pid for CPU
    probes (None: not ours)."""

    variant: str
    target: Target
    root_url: str | None
    server_pid: int | None = None
    max_num_seqs: int | None = None  # the managed server's admission cap (None: not ours, unknown)


def gateway_arm(variant: str) -> str:
    """The name of ``variant``'s gateway arm (its report: reports/loadtest/<variant>@gateway.json)."""
    return variant + GATEWAY_SUFFIX


def cache_salt(arm: str) -> str:
    """The arm's prefix-cache salt: a digest of its name (vLLM refuses '@', '/', '\\' and NUL in a
    salt, and more than 128 characters)."""
    return "arm-" + hashlib.sha256(arm.encode()).hexdigest()[:16]


def target(cfg: LoadtestConfig, base_url: str, variant: str | None = None) -> Target:
    """The endpoint of ``variant``'s arm: requests name ``loadtest.model``, else the served name of
    the variant's server (its ``server_overrides`` may rename it), else ``server``'s."""
    server = server_config(cfg, variant) if variant and not cfg.base_url else cfg.server
    return Target(base_url=base_url, model=cfg.model or server.model_name,
                  endpoint=cfg.endpoint, stream=cfg.stream,
                  api_key=cfg.api_key or cfg.server.api_key, ignore_eos=cfg.workload.ignore_eos)


def server_config(cfg: LoadtestConfig, variant: str):
    """The managed server for ``variant``: its folder models/<variant> (or ``model_dir``), with
    ``server_overrides[variant]`` applied (a configuration compared under its own name). A ``vllm``
    arm of ``loadtest.arms`` serves models/<its variant> under its own name."""
    arm = arm_config(cfg, variant)
    folder = arm.variant or arm.name if isinstance(arm, VllmArm) else variant
    over = cfg.server_overrides.get(variant, {})
    merged = {**cfg.server.model_dump(), "model_dir": variants.model_dir(folder, cfg.model_dir), **over}
    return type(cfg.server).model_validate(merged)


def arm_config(cfg: LoadtestConfig, name: str) -> VllmArm | LlamaCppArm | UrlArm | None:
    """The ``loadtest.arms`` entry called ``name``; None for a variant."""
    return next((a for a in cfg.arms if a.name == name), None)


def api_key(arm: UrlArm) -> str | None:
    """The URL arm's key, read from the environment variable it names (never from params)."""
    if arm.api_key_env is None:
        return None
    value = os.environ.get(arm.api_key_env)
    if not value:
        raise ValueError(f"loadtest.arms '{arm.name}': api_key_env names the environment variable "
                         f"'{arm.api_key_env}', which is not set (or empty): export it before running")
    return value


def arm_target(cfg: LoadtestConfig, name: str, base_url: str) -> Target:
    """The requests' target for the arm ``name`` at ``base_url``: the run's endpoint settings, with
    a ``loadtest.arms`` entry's own model name and key."""
    arm = arm_config(cfg, name)
    if isinstance(arm, UrlArm):
        return dataclasses.replace(target(cfg, base_url), model=arm.model, api_key=api_key(arm))
    if isinstance(arm, LlamaCppArm):
        return dataclasses.replace(target(cfg, base_url), model=arm.server.model_name, api_key=None)
    return target(cfg, base_url, name)  # a variant, or a vllm arm: its server's served name


@contextlib.contextmanager
def _llamacpp(arm: LlamaCppArm, log_dir: Path):
    from workbench.llamacpp import LlamaCppServer  # a subprocess; xllamacpp is imported there only

    with LlamaCppServer(arm.server, log_path=log_dir / "llamacpp.log") as server:
        yield server.base_url, {"managed": True, "engine": "llama.cpp", "base_url": server.base_url,
                                "model_file": str(server.model_path), "startup_s": server.startup_s,
                                "log": str(server.log_path), "pid": server.proc.pid,
                                "parallel": arm.server.parallel, "command": server.shown_command()}


@contextlib.contextmanager
def endpoint(cfg: LoadtestConfig, variant: str, log_dir: Path):
    """(base_url, details): the configured URL, or a managed vLLM up for the block; for a
    ``loadtest.arms`` entry, its URL or its managed llama.cpp / vLLM server."""
    arm = arm_config(cfg, variant)
    if isinstance(arm, UrlArm):  # the key's variable is named, never its value
        yield arm.base_url, {"managed": False, "engine": "url", "base_url": arm.base_url, "model": arm.model,
                             "api_key_env": arm.api_key_env, "max_rate_req_per_s": arm.max_rate_req_per_s}
        return
    if isinstance(arm, LlamaCppArm):
        with _llamacpp(arm, log_dir) as up:
            yield up
        return
    if cfg.base_url:
        yield cfg.base_url.rstrip("/"), {"managed": False, "base_url": cfg.base_url}
        return
    from workbench.serve import VLLMServer  # imports httpx only, never vLLM

    with VLLMServer(server_config(cfg, variant), log_path=log_dir / "vllm.log") as server:
        yield server.base_url, {"managed": True, "engine": "vllm", "base_url": server.base_url,
                                "model_dir": server.cfg.model_dir, "startup_s": server.startup_s, "device": server.device,
                                "log": str(server.log_path), "pid": server.proc.pid,
                                "command": server.shown_command()}


@contextlib.contextmanager
def gateway_in_front(cfg: LoadtestConfig, upstream_url: str, model: str, log_dir: Path,
                     upstream_key: str | None = None):
    """The gateway as its own process in front of ``upstream_url`` (``upstream_key``: the server's
    own --api-key, sent upstream by the gateway); yields (base_url, api_key)."""
    import secrets

    import yaml

    from workbench.gateway.keys import hash_key
    from workbench.gateway.process import GatewayProcess
    from workbench.net import ServerError, free_port

    key = "wb-" + secrets.token_urlsafe(24)
    gw = deep_merge(yaml.safe_load(Path(cfg.gateway_config).read_text()), cfg.gateway_overrides)
    upstream = {"base_url": upstream_url, **({"api_key": upstream_key} if upstream_key else {})}
    gw.update(upstreams={model: upstream}, keys=[{"id": "loadtest", "sha256": hash_key(key)}],
              keys_file=None)
    gw["audit"] = {**gw.get("audit", {}), "path": str(log_dir / "gateway-audit.sqlite")}
    conf = log_dir / "gateway.yaml"
    conf.write_text(yaml.safe_dump(gw))
    from workbench.gateway.config import GatewayConfigError, load_config
    try:  # a misspelled override fails here, named, not as a gateway that never came up
        load_config(conf)
    except GatewayConfigError as err:
        raise ServerError(f"the gateway config for {log_dir.name} ({cfg.gateway_config} with "
                          f"loadtest.gateway_overrides {cfg.gateway_overrides}) is not valid: {err}") from None
    with GatewayProcess(conf, free_port(), log_path=log_dir / "gateway.log") as server:  # ServerError if not up
        log.info("load test goes through the gateway at %s", server.base_url)
        yield server.base_url, key


def start_endpoints(cfg: LoadtestConfig, variants: list[str], stack: contextlib.ExitStack) -> dict:
    """Each variant's endpoint entered on ``stack``: {variant: (base_url, info)}, or the
    ServerError that says why it cannot be served. One after another, or with
    ``cfg.parallel_start`` all at once (a GPU host: minutes of server starts become one); a server
    that fails to start beside the others is tried once more on its own before it is given up."""
    from workbench.serve import ServerError

    def one(v: str):
        try:
            return stack.enter_context(endpoint(cfg, v, Path(cfg.out_dir) / v))
        except ServerError as err:
            return err

    if not cfg.parallel_start or len(variants) < 2:
        return {v: one(v) for v in variants}
    import concurrent.futures

    managers = {v: endpoint(cfg, v, Path(cfg.out_dir) / v) for v in variants}
    log.info("starting %d servers at once: %s", len(variants), ", ".join(variants))
    # The pool's threads must outlive the servers they started: a managed server dies with the
    # thread that spawned it (serve._die_with_parent, PR_SET_PDEATHSIG). Entered on the stack first,
    # the pool shuts down after every server's exit (the stack unwinds last in, first out).
    pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(len(variants), "server-start"))
    futures = {v: pool.submit(cm.__enter__) for v, cm in managers.items()}
    concurrent.futures.wait(futures.values())
    started, unexpected = {}, None
    for v, future in futures.items():  # every server that came up is stopped with the stack
        try:
            started[v] = future.result()
            stack.push(managers[v].__exit__)
        except ServerError as err:
            started[v] = err
        except BaseException as err:  # noqa: BLE001 - raised below, once the others are on the stack
            unexpected = unexpected or err
    if unexpected is not None:
        raise unexpected
    for v in [v for v in variants if isinstance(started[v], ServerError)]:
        log.warning("%s did not start beside the others (%s); trying it alone", v,
                    str(started[v]).splitlines()[0] if str(started[v]) else type(started[v]).__name__)
        started[v] = one(v)
    return started


def check_alive(arms: list[Arm], infos: dict[str, dict]) -> None:
    """Every managed server still answers /health before the first step: one that died after its
    start would otherwise turn the whole run into connection errors, measured and reported."""
    from workbench.net import wait_http_ok
    from workbench.serve import ServerError, tail

    for arm in arms:
        info = infos.get(arm.variant, {})
        if not info.get("managed") or not arm.root_url:
            continue
        if not wait_http_ok(f"{arm.root_url}/health", ALIVE_TIMEOUT_S):
            log_path = info.get("log")
            raise ServerError(f"{arm.variant}: the server at {arm.root_url} stopped answering before the first "
                              f"step" + (f"; its log ends:\n{tail(Path(log_path))}" if log_path else ""))


def arm_names(variants: list[str], gateway_arms: list[str], arms: tuple = ()) -> list[str]:
    """Every arm's name, in the run's base order: each variant, its gateway arm right after it,
    then the ``loadtest.arms`` entries (``arms``: their configs or names) in their order."""
    via = set(gateway_arms)
    return [n for v in variants for n in ([v, gateway_arm(v)] if v in via else [v])] + \
        [getattr(a, "name", a) for a in arms]


def open_arms(cfg: LoadtestConfig, variants: list[str], stack: contextlib.ExitStack
              ) -> tuple[list[Arm], dict[str, dict], dict[str, Exception]]:
    """Every arm of the run up on ``stack``: (arms in base order, {arm: server info}, {arm: the
    ServerError of a variant that could not be served here, for it and its gateway arm})."""
    from workbench.serve import ServerError

    via = list(dict.fromkeys(cfg.gateway_arms))
    arms: list[Arm] = []
    infos: dict[str, dict] = {}
    failed: dict[str, Exception] = {}
    every = list(variants) + [a.name for a in cfg.arms]  # loadtest.arms after the variants
    started = start_endpoints(cfg, every, stack)  # the servers stay up together
    for v in every:
        if isinstance(started[v], ServerError):  # the variant cannot be served here: say so, measure the rest
            failed[v] = started[v]
            if v in via:
                failed[gateway_arm(v)] = started[v]
            continue
        base_url, info = started[v]
        extra = arm_config(cfg, v)
        # The server's own /metrics, also behind a gateway; a URL arm's is not ours to scrape.
        root_url = None if isinstance(extra, UrlArm) else base_url.removesuffix("/v1")
        tgt = arm_target(cfg, v, base_url)
        # One prefix cache per arm on our vLLM: a gateway arm sends the direct arm's prompts to its
        # server (a URL or llama.cpp arm may refuse the field, and shares no server with another).
        salted = bool(info.get("managed")) and info.get("engine", "vllm") == "vllm"
        if salted:
            tgt = dataclasses.replace(tgt, cache_salt=cache_salt(v))
        if cfg.via_gateway:
            gw_url, key = stack.enter_context(gateway_in_front(cfg, base_url, tgt.model, Path(cfg.out_dir) / v))
            tgt = dataclasses.replace(tgt, base_url=gw_url, api_key=key)
            info = {**info, "via_gateway": gw_url}
        # The admission cap: vLLM's max_num_seqs, llama.cpp's slots; unknown for a URL.
        cap = (extra.server.parallel if isinstance(extra, LlamaCppArm)
               else server_config(cfg, v).max_num_seqs if info.get("managed") else None)
        infos[v] = {**info, "max_num_seqs": cap} if cap else info
        arms.append(Arm(v, tgt, root_url, info.get("pid"), cap))
        if v in via:  # a second arm on the same server, through its own gateway
            name = gateway_arm(v)
            gw_url, key = stack.enter_context(gateway_in_front(cfg, base_url, tgt.model,
                                                               Path(cfg.out_dir) / name, tgt.api_key))
            infos[name] = {**info, "via_gateway": gw_url, "direct_arm": v}
            arms.append(Arm(name, dataclasses.replace(tgt, base_url=gw_url, api_key=key,
                                                      cache_salt=cache_salt(name) if salted else None), root_url,
                            info.get("pid"), cap))
    check_alive(arms, infos)
    return arms, infos, failed
