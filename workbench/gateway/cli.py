"""``workbench gateway``: serve the gateway, and look after its keys and audit log.

    workbench gateway [--config deploy/gateway.yaml] [--host 0.0.0.0] [--port 8080]
    workbench gateway add-key team-a --rpm 600 --tpm 200000   # prints the key once
    workbench gateway add-key prometheus --metrics            # a key that reads /metrics only
    workbench gateway revoke-key team-a                       # a running gateway drops it in seconds
    workbench gateway prune                                   # audit rows past retention_days
    workbench gateway export-audit --since 2026-01-01 --out audit.jsonl

Only argparse at import: the gateway's own modules load when a command runs.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone

CONFIG_HELP = "gateway config (default: deploy/gateway.yaml)"


def add_parser(sub) -> None:
    """Add ``gateway`` and its commands to the workbench CLI's subparsers."""
    p = sub.add_parser("gateway", help="the API gateway in front of vLLM (keys, limits, filter, audit)")
    p.add_argument("--config", default="deploy/gateway.yaml", help=CONFIG_HELP)
    p.add_argument("--host", default=None, help="default: the config's host")
    p.add_argument("--port", type=int, default=None, help="default: the config's port")
    p.set_defaults(gateway_func=_serve)
    cmds = p.add_subparsers(dest="gateway_command")

    def child(name: str, help_: str, func):
        c = cmds.add_parser(name, help=help_)
        c.add_argument("--config", default=argparse.SUPPRESS, help=CONFIG_HELP)  # keep the parent's
        c.set_defaults(gateway_func=func)
        return c

    c = child("add-key", "create an API key: stores its SHA-256 in keys_file, prints the key once", _add_key)
    c.add_argument("id", help="key id (labels metrics, audit rows and limits)")
    c.add_argument("--rpm", type=_per_minute, default=None, help="requests per minute (default: no limit)")
    c.add_argument("--tpm", type=_per_minute, default=None, help="tokens per minute (default: no limit)")
    c.add_argument("--metrics", action="store_true", help="a key for /metrics only (Prometheus)")
    c = child("revoke-key", "remove a key from keys_file; a running gateway drops it without a restart",
              _revoke_key)
    c.add_argument("id", help="key id")
    child("prune", "delete audit rows older than audit.retention_days", _prune)
    c = child("export-audit", "write audit rows as JSONL (for Loki, Vector, Fluent Bit)", _export)
    c.add_argument("--out", default="-", help="file (default: stdout)")
    c.add_argument("--since", type=_since, default=None, help="ISO date/time (UTC) or unix seconds")


def _per_minute(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be above 0, got {text} (leave the flag out for no limit)")
    return value


def run(args: argparse.Namespace) -> int:
    from workbench.gateway.config import GatewayConfigError

    try:
        return args.gateway_func(args)
    except GatewayConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _cfg(args):
    from workbench.gateway.config import load_config

    return load_config(args.config, host=getattr(args, "host", None), port=getattr(args, "port", None))


def _serve(args) -> int:
    from workbench.gateway.server import serve

    serve(_cfg(args))
    return 0


def _add_key(args) -> int:
    import yaml

    from workbench.gateway.keys import hash_key, new_key

    cfg = _cfg(args)
    if args.id in {k.id for k in cfg.all_keys()}:
        print(f"error: key id '{args.id}' exists", file=sys.stderr)
        return 2
    key = new_key()
    rec = {"id": args.id, "sha256": hash_key(key)}
    if args.rpm is not None:
        rec["requests_per_minute"] = args.rpm
    if args.tpm is not None:
        rec["tokens_per_minute"] = args.tpm
    if args.metrics:
        rec["role"] = "metrics"
    if cfg.keys_file:
        from pathlib import Path

        path = Path(cfg.keys_file)
        keys = (yaml.safe_load(path.read_text()) or []) if path.exists() else []
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(keys + [rec], sort_keys=False))
        tmp.replace(path)  # atomic: a gateway re-reading the file never sees half of it
        print(f"added key '{args.id}' to {path}; a running gateway loads it within "
              f"{cfg.keys_reload_s:g} s (keys_reload_s) or on SIGHUP", file=sys.stderr)
    else:
        print("no keys_file in the config; add this under `keys:`\n" +
              yaml.safe_dump([rec], sort_keys=False), file=sys.stderr)
    print(key)  # the only time the key is shown
    return 0


def _revoke_key(args) -> int:
    from pathlib import Path

    import yaml

    cfg = _cfg(args)
    if args.id in {k.id for k in cfg.keys}:
        print(f"error: key '{args.id}' is inline under `keys:` in {args.config}: remove it there and "
              "restart the gateway", file=sys.stderr)
        return 2
    path = Path(cfg.keys_file) if cfg.keys_file else None
    keys = (yaml.safe_load(path.read_text()) or []) if path and path.exists() else []
    kept = [k for k in keys if not (isinstance(k, dict) and k.get("id") == args.id)]
    if len(kept) == len(keys):
        print(f"error: no key '{args.id}' in {path or 'the config (no keys_file)'}", file=sys.stderr)
        return 2
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(kept, sort_keys=False))
    tmp.replace(path)  # atomic: a gateway re-reading the file never sees half of it
    print(f"revoked key '{args.id}' in {path}; a running gateway drops it within "
          f"{cfg.keys_reload_s:g} s (keys_reload_s) or on SIGHUP", file=sys.stderr)
    if cfg.limits.backend == "redis":  # every instance sharing the Redis refuses it from now on
        import asyncio

        from workbench.gateway.store import RedisStore

        async def revoke() -> None:
            store = RedisStore(cfg.limits)
            try:
                await store.revoke(args.id)
            finally:
                await store.aclose()

        asyncio.run(revoke())
        print(f"revoked key '{args.id}' in Redis ({cfg.limits.redis_url}) for every gateway instance",
              file=sys.stderr)
    return 0


def _audit_db(cfg) -> bool:
    """The audit database exists (prune and export never create an empty one)."""
    from pathlib import Path

    if Path(cfg.audit.path).is_file():
        return True
    print(f"error: audit database not found: {Path(cfg.audit.path).absolute()} (audit.path; "
          "relative paths are read from the current directory)", file=sys.stderr)
    return False


def _prune(args) -> int:
    from workbench.gateway.auditdb import prune

    cfg = _cfg(args)
    if not _audit_db(cfg):
        return 2
    n = prune(cfg.audit)
    print(f"pruned {n} audit rows older than {cfg.audit.retention_days:g} days from {cfg.audit.path}")
    return 0


def _since(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO date/time (2026-01-01, 2026-01-01T12:00) nor unix seconds") from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def _export(args) -> int:
    from workbench.gateway.auditdb import export_jsonl

    cfg = _cfg(args)
    if not _audit_db(cfg):
        return 2
    if args.out == "-":
        n = export_jsonl(cfg.audit, sys.stdout, args.since)
    else:
        with open(args.out, "w", encoding="utf-8") as f:
            n = export_jsonl(cfg.audit, f, args.since)
    print(f"exported {n} audit rows", file=sys.stderr)
    return 0
