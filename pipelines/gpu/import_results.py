"""Log a GPU run's returned reports into this project's MLflow store, and keep them under results/.

    python -m pipelines.gpu.import_results /path/to/gpu-results.tar.gz [--results results/gpu]

The device machine keeps nothing, so its MLflow store would be lost with it: the runner returns
the reports themselves (versioned JSON with git SHA, GPU, package versions, config), and this logs
each one as its stage would have on this machine - a ``<stage>:<variant>`` run under the variant's
parent, load-test steps as nested runs, the seed table as an artifact. The report JSONs and the
summary are copied to ``results/gpu/`` (committed: the README cites them); the store is not.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from workbench import tracking
from workbench.cli import log_saved_report
from workbench.reports import read_report

log = logging.getLogger(__name__)


def scrub(path: Path) -> None:
    """The device's own paths out of a report that will be committed: data folders relative to the
    repo, interpreters by name."""
    import re

    text = path.read_text()
    text = re.sub(r'"/[^"]*?/(data/[^"]*)"', r'"\1"', text)
    text = re.sub(r'/[^\s"]*/bin/(python3?)\b', r"\1", text)
    path.write_text(text)


def relabel(path: Path) -> None:
    """Re-derive each step's ``limited_by`` with this checkout's rule (probes.limiting_factor) from
    the step's own metrics; the label the run wrote is kept as ``limited_by_at_run``."""
    import json

    from workbench.loadgen.probes import limiting_factor

    data = json.loads(path.read_text())
    for step, row in zip(data["details"]["steps"], data["details"].get("table", [])):
        step.setdefault("limited_by_at_run", step.get("limited_by"))
        step["limited_by"] = row["limited by"] = limiting_factor(step["metrics"])
    path.write_text(json.dumps(data, indent=2))


def write_summary(root: Path, dest: Path) -> None:
    """summary.md / summary.json rebuilt from the reports themselves (not the runner's running copy)."""
    import json

    from pipelines.gpu.gpu_run import markdown, summarize

    old = json.loads((root / "runs/gpu/summary.json").read_text()) if (root / "runs/gpu/summary.json").exists() else {}
    summary = {k: old[k] for k in ("gpu", "gpus", "vllm", "torch", "cpus", "phase_s", "host") if k in old}
    reports = sorted((root / "reports/loadtest").glob("*.json"), key=lambda p: read_report(p).created_at)
    summary["loadtest"] = []
    for path in reports:
        rep = read_report(path)
        server = rep.config.get("server", {})
        over = {k: server[k] for k in ("api_server_count", "stream_interval", "async_scheduling",
                                       "engine_core_nice", "max_num_batched_tokens") if server.get(k)}
        summary["loadtest"].append(summarize(rep, over))
    if (root / "reports/gpu/crosscheck.json").exists():
        summary["crosscheck"] = json.loads((root / "reports/gpu/crosscheck.json").read_text())
    if (root / "reports/shard/base.json").exists():
        rep = read_report(root / "reports/shard/base.json")
        summary["shard"] = {**rep.metrics, "answer": rep.details["reload"].get("answer")}
    summary["evaluate"] = {read_report(p).variant: {k: read_report(p).metrics.get(k) for k in (
        "mmlu_acc", "ceval_acc", "ppl_word", "eval_s")} | {"timings": read_report(p).details.get("timings")}
        for p in sorted((root / "reports/evaluate").glob("*.json"))}
    (dest / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (dest / "summary.md").write_text(markdown(summary))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("archive", help="gpu-results.tar.gz from the device run")
    p.add_argument("--results", default="results/gpu")
    p.add_argument("--experiment", default="llm-workbench")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dest = Path(a.results)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(a.archive) as tar:
            tar.extractall(tmp, filter="data")
        root = Path(tmp)
        for path in sorted((root / "reports").rglob("*.json")):
            rel = path.relative_to(root / "reports")
            (dest / rel.parent).mkdir(parents=True, exist_ok=True)
            if rel.parts[0] == "loadtest":
                relabel(path)
            scrub(path)
            shutil.copy(path, dest / rel)
            if rel.parts[0] not in ("loadtest", "shard", "evaluate", "prepare"):
                continue
            report = read_report(path)
            # The stage's outputs (tables, plots) as they came back in the archive, if they did.
            outputs = {k: str(root / v) for k, v in report.outputs.items() if (root / v).is_file()}
            log_saved_report(report.model_copy(update={"outputs": outputs}), a.experiment,
                             variant_prefix="gpu-")  # GPU runs apart from this machine's
        write_summary(root, dest)
    print(f"reports in {dest}; MLflow store: {tracking.tracking_uri()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
