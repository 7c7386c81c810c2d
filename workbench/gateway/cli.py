"""``workbench gateway``: serve the gateway, and look after its keys and audit log.

    workbench gateway [--config deploy/gateway.yaml] [--host 0.0.0.0] [--port 8080]
    workbench gateway add-key team-a --rpm 600 --tpm 200000   # prints the key once
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
    c.add_argument("--rpm", type=float, default=None, help="requests per minute (default: no limit)")
    c.add_argument("--tpm", type=float, default=None, help="tokens per minute (default: no limit)")
    child("prune", "delete audit rows older than audit.retention_days", _prune)
    c = child("export-audit", "write audit rows as JSONL (for Loki, Vector, Fluent Bit)", _export)
    c.add_argument("--out", default="-", help="file (default: stdout)")
    c.add_argument("--since", default=None, help="ISO date/time (UTC) or unix seconds")


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
    if args.rpm:
        rec["requests_per_minute"] = args.rpm
    if args.tpm:
        rec["tokens_per_minute"] = args.tpm
    if cfg.keys_file:
        from pathlib import Path

        path = Path(cfg.keys_file)
        keys = (yaml.safe_load(path.read_text()) or []) if path.exists() else []
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(keys + [rec], sort_keys=False))
        print(f"added key '{args.id}' to {path}; restart the gateway to load it", file=sys.stderr)
    else:
        print("no keys_file in the config; add this under `keys:`\n" +
              yaml.safe_dump([rec], sort_keys=False), file=sys.stderr)
    print(key)  # the only time the key is shown
    return 0


def _prune(args) -> int:
    from workbench.gateway.audit import prune

    cfg = _cfg(args)
    n = prune(cfg.audit)
    print(f"pruned {n} audit rows older than {cfg.audit.retention_days:g} days from {cfg.audit.path}")
    return 0


def _since(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        dt = datetime.fromisoformat(text)
        return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def _export(args) -> int:
    from workbench.gateway.audit import export_jsonl

    cfg = _cfg(args)
    if args.out == "-":
        n = export_jsonl(cfg.audit, sys.stdout, _since(args.since))
    else:
        with open(args.out, "w", encoding="utf-8") as f:
            n = export_jsonl(cfg.audit, f, _since(args.since))
    print(f"exported {n} audit rows", file=sys.stderr)
    return 0
