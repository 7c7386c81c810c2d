"""Log a GPU run's returned reports into this project's MLflow store, and keep them under results/.

    python -m pipelines.gpu.import_results runs/gpu-repro/results.tar.gz [--results results/gpu-N]

The device machine keeps nothing, so its MLflow store would be lost with it: pipelines/gpu/repro.sh
returns the reports themselves in ``results.tar.gz`` (versioned JSON with git SHA, GPU, package
versions, config), and this logs each one as its stage would have on this machine - a
``<stage>:<variant>`` run under the variant's parent, with a ``gpu-`` prefix on the variant. The
load test comes back as one report per compared arm (a variant, or a serving configuration of
params-serving-configs.yaml: ``loadtest:gpu-<name>``, metrics with their ``_ci_lo``/``_ci_hi``, one
nested run per step, the per-rate table and plots as artifacts) and the comparison's own report
``all.json`` (``loadtest:gpu-all``: the interleaved order, the drift check and its metrics, and
summary.md rebuilt from the reports by pipelines/gpu/summary.py). The report JSONs, the report
stage's plots and the summary are copied to ``--results`` (committed: the README cites them); the
store is not.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from pipelines.gpu import summary as gpu_summary
from workbench import loadtest, logconfig, tracking
from workbench.cli import log_saved_report
from workbench.evaluate.details import EvaluateDetails
from workbench.reports import read_report, report_path
from workbench.shard import ShardDetails

log = logging.getLogger(__name__)


def scrub(path: Path) -> None:
    """The device's own paths out of a report that will be committed: data folders relative to the
    repo, interpreters by name."""
    import re

    text = path.read_text()
    text = re.sub(r'"/[^"]*?/(data/[^"]*)"', r'"\1"', text)
    text = re.sub(r'/[^\s"]*/bin/(python3?)\b', r"\1", text)
    path.write_text(text)


def write_summary(root: Path, dest: Path) -> None:
    """summary.md / summary.json rebuilt from the reports themselves (pipelines/gpu/summary.py); the
    GPU and vLLM version from the load test's provenance."""
    import json

    summary: dict = {}
    comparison = root / report_path("loadtest", loadtest.VARIANT)
    if comparison.exists():
        rep = read_report(comparison)
        summary["loadtest"] = gpu_summary.loadtest_summary(rep, gpu_summary.comparison_reports(rep, root))
        summary["gpu"] = ", ".join(rep.provenance.gpu or []) or "?"
        summary["vllm"] = (rep.provenance.packages or {}).get("vllm", "?")
    if (root / "reports/shard/base.json").exists():
        rep = read_report(root / "reports/shard/base.json")
        summary["shard"] = {**rep.metrics, "answer": ShardDetails.of(rep).reload.answer}
    evaluated = [read_report(p) for p in sorted((root / "reports/evaluate").glob("*.json"))]
    if evaluated:
        summary["evaluate"] = {r.variant: {k: r.metrics.get(k) for k in ("mmlu_acc", "ceval_acc", "ppl_word", "eval_s")}
                               | {"timings": EvaluateDetails.of(r).timings} for r in evaluated}
    (dest / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (dest / "summary.md").write_text(gpu_summary.markdown(summary))


def log_comparison(report, summary_md: Path, experiment: str) -> bool:
    """The compared run's own report (order, drift check) as ``loadtest:gpu-all``, with the
    summary as an artifact. Not through ``loadtest.track``: that would log every configuration's
    steps a second time, and they have their own runs."""
    with tracking.stage_run(report.stage, "gpu-" + report.variant, experiment, system_metrics=False) as run:
        run.log_report(report)
        run.log_artifact(summary_md, "loadtest")
    log.info("logged %s:gpu-%s", report.stage, report.variant)
    return run.active


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("archive", help="results.tar.gz from pipelines/gpu/repro.sh")
    p.add_argument("--results", default="results/gpu")
    p.add_argument("--experiment", default="llm-workbench")
    a = p.parse_args(argv)
    logconfig.setup()
    dest = Path(a.results)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(a.archive) as tar:
            tar.extractall(tmp, filter="data")
        root = Path(tmp)
        comparisons = []
        for path in sorted((root / "reports").rglob("*.json")):
            rel = path.relative_to(root / "reports")
            (dest / rel.parent).mkdir(parents=True, exist_ok=True)
            scrub(path)
            shutil.copy(path, dest / rel)
            if rel.parts[0] not in ("loadtest", "shard", "evaluate", "prepare", "quantize", "report") \
                    or "plots" in rel.parts:  # the report's plot data (DVC plots), not reports
                continue
            report = read_report(path)
            if report.stage == loadtest.STAGE and report.variant == loadtest.VARIANT:
                comparisons.append(report)  # logged with the summary rebuilt below
                continue
            # The stage's outputs (tables, plots) as they came back in the archive, if they did.
            outputs = {k: str(root / v) for k, v in report.outputs.items() if (root / v).is_file()}
            for v in map(Path, report.outputs.values()):  # the plots that are a report's own, beside it
                if str(root / v) in outputs.values() and v.parts[0] == "reports" and v.suffix == ".png":
                    shutil.copy(root / v, dest / v.relative_to("reports"))
            log_saved_report(report.model_copy(update={"outputs": outputs}), a.experiment,
                             variant_prefix="gpu-")  # GPU runs apart from this machine's
        write_summary(root, dest)
        for report in comparisons:
            log_comparison(report, dest / "summary.md", a.experiment)
    print(f"reports in {dest}; MLflow store: {tracking.tracking_uri()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
