"""``workbench <stage>``: the same ``run(cfg)`` the notebooks call, from the shell.

    workbench prepare --set prepare.model.source=/models/my-model
    workbench evaluate --variant gptq-int4
    workbench quantize --variant gptq-int4   # in .venv-quant (llm-compressor)
    workbench serve                   # vLLM chat + embeddings until Ctrl-C
    workbench ui                      # MLflow UI on the project's store
    workbench ui --team               # a team's MLflow server: PostgreSQL, proxied artifacts (docs/team.md)
    workbench check                   # validate params.yaml and stop
    workbench deploy                  # Kubernetes manifests for the report's recommended variant
    workbench gateway                 # the API gateway (see workbench/gateway/cli.py)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from workbench import logconfig
from workbench.config import ConfigError, load_params
from workbench.stages import STAGES, log_to, run_tracked

log = logging.getLogger("workbench")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a param, e.g. prepare.dtype=float32 (repeatable)")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")


def run_stage(name: str, args: argparse.Namespace) -> int:
    stage = STAGES[name]
    if missing := stage.missing():
        print(f"error: stage '{name}' needs {', '.join(missing)}, which {sys.executable} cannot import; "
              f"run it in {stage.environment}: . {stage.environment}/bin/activate && workbench {name} ...",
              file=sys.stderr)
        return 2
    params = load_params(args.params, [*args.set, *stage.variant_overrides(getattr(args, "variant", None))])
    report = run_tracked(name, params, track=not args.no_track)
    print(report.path)
    return 0


def log_saved_report(report, experiment: str, variant_prefix: str = "") -> tuple[str, bool]:
    """Log a saved report to MLflow as its stage would have (the stage's own ``track`` included):
    for when MLflow was down (a stage then only warns) or the report comes from another machine.
    Returns the run's name and whether MLflow took it."""
    from workbench import tracking

    if variant_prefix and not report.variant.startswith(variant_prefix):
        report = report.model_copy(update={"variant": variant_prefix + report.variant})
    with tracking.stage_run(report.stage, report.variant, experiment, system_metrics=False) as run:
        log_to(run, report)
    log.info("logged %s:%s", report.stage, report.variant)
    return f"{report.stage}:{report.variant}", run.active


def track(args: argparse.Namespace) -> int:
    from workbench.reports import read_report

    experiment = load_params(args.params, args.set).project.experiment
    for path in args.reports:
        name, ok = log_saved_report(read_report(path), experiment, args.variant_prefix)
        print(f"logged {name} ({'ok' if ok else 'MLflow unavailable'})")
    return 0


def ui(args: argparse.Namespace) -> int:
    if args.team:
        from workbench.team import TeamServerConfig, TeamServerError, serve_forever

        try:
            given = dict(db=args.db, artifacts=args.artifacts, workers=args.workers,
                         allowed_hosts=args.allowed_hosts)
            return serve_forever(TeamServerConfig(
                dir=Path(args.dir), host=args.host, port=args.port,
                **{k: v for k, v in given.items() if v is not None}))
        except TeamServerError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    from workbench.tracking import ARTIFACT_DIR, tracking_uri

    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri(),
           "--default-artifact-root", str(Path(ARTIFACT_DIR).resolve()),
           "--host", args.host, "--port", str(args.port), "--workers", "1"]
    print(f"MLflow UI on http://{args.host}:{args.port}  (Ctrl-C stops it)")
    sys.stdout.flush()
    # mlflow in this process's place: a SIGTERM or Ctrl-C meant for `workbench ui` reaches mlflow,
    # which stops the server and job consumers it started (a child here would outlive us with them).
    os.execv(sys.executable, cmd)


def serve(args: argparse.Namespace) -> int:
    from workbench.serve import serve_forever

    serve_forever(load_params(args.params, args.set).serve)
    return 0


def deploy(args: argparse.Namespace) -> int:
    from workbench import deploy as deploy_

    result = deploy_.run(load_params(args.params, args.set), args.variant, args.out)
    print(f"{result.out_dir}  ({result.variant}: {'LeaderWorkerSet' if result.multi_node else 'Deployment'}, "
          f"{len(result.files)} files)  kubectl apply -k {result.out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workbench", description="LLM Workbench")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, stage in STAGES.items():
        p = sub.add_parser(name, help=f"run the {name} stage")
        _common(p)
        if stage.fans_out:
            p.add_argument("--variant", default=None,
                           help=f"model variant: sets {stage.section}.variant (default: params.yaml's)")
    p = sub.add_parser("check", help="validate params.yaml and exit")
    _common(p)
    _common(sub.add_parser("serve", help="keep vLLM chat + embedding endpoints up until Ctrl-C"))
    p = sub.add_parser("track", help="log saved report JSONs to MLflow (after an outage, or from another machine)")
    _common(p)
    p.add_argument("reports", nargs="+", help="reports/<stage>/<variant>.json ...")
    p.add_argument("--variant-prefix", default="", help="e.g. gpu- to keep another machine's runs apart")
    p = sub.add_parser("deploy", help="render Kubernetes manifests (Kustomize) for the recommended variant")
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a param, e.g. deploy.gpus_per_node=4 (repeatable)")
    p.add_argument("--variant", default=None,
                   help="variant to deploy (default: deploy.variant, else reports/report/all.json's recommendation)")
    p.add_argument("--out", default=None, help="folder for the manifests (default: <deploy.out_dir>/<variant>)")
    p = sub.add_parser("ui", help="open the MLflow UI on the project store, or run the team server (--team)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--team", action="store_true",
                   help="the team's tracking server: MLflow on PostgreSQL, artifacts proxied (docs/team.md)")
    team = p.add_argument_group("--team")
    team.add_argument("--dir", default="mlflow-team",
                      help="holds the PostgreSQL cluster (postgres/) and the artifacts (artifacts/) (default: %(default)s)")
    team.add_argument("--db", default=None, metavar="URI",
                      help="an existing PostgreSQL, postgresql://user@host/db (default: $MLFLOW_BACKEND_STORE_URI, "
                           "else a cluster in --dir)")
    team.add_argument("--artifacts", default=None, metavar="DIR_OR_URI",
                      help="where the server stores artifacts: a directory or s3://bucket/prefix (default: <dir>/artifacts)")
    team.add_argument("--workers", type=int, default=None, help="MLflow server workers (default: MLflow's 4)")
    team.add_argument("--allowed-hosts", default=None,
                      help="Host headers to accept beyond localhost, e.g. mlflow.lab:5000 (with --host 0.0.0.0)")
    from workbench.gateway.cli import add_parser as add_gateway_parser

    add_gateway_parser(sub)
    args = parser.parse_args(argv)
    logconfig.setup(os.environ.get("WORKBENCH_LOG", "INFO"))
    try:
        if args.command in STAGES:
            return run_stage(args.command, args)
        if args.command == "check":
            load_params(args.params, args.set)
            print(f"{args.params}: ok")
            return 0
        if args.command == "ui":
            return ui(args)
        if args.command == "track":
            return track(args)
        if args.command == "serve":
            return serve(args)
        if args.command == "deploy":
            return deploy(args)
        if args.command == "gateway":
            from workbench.gateway.cli import run as run_gateway

            return run_gateway(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
