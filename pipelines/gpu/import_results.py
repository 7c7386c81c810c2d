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

from workbench import loadtest, tracking
from workbench.reports import read_report

log = logging.getLogger(__name__)


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
        for name in ("summary.md", "summary.json"):
            if (root / "runs/gpu" / name).exists():
                shutil.copy(root / "runs/gpu" / name, dest / name)
        for path in sorted((root / "reports").rglob("*.json")):
            rel = path.relative_to(root / "reports")
            (dest / rel.parent).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, dest / rel)
            if rel.parts[0] not in ("loadtest", "shard", "evaluate", "prepare"):
                continue
            report = read_report(path)
            with tracking.stage_run(report.stage, report.variant, a.experiment, system_metrics=False) as run:
                run.log_report(report)
                if report.stage == "loadtest":
                    summary = root / "runs/loadtest" / report.variant / "summary.md"
                    if summary.exists():
                        run.log_artifact(summary, "loadtest")
                    for plot in ("latency_vs_rate.png", "ttft_cdf.png"):
                        if (root / "runs/loadtest" / report.variant / plot).exists():
                            run.log_artifact(root / "runs/loadtest" / report.variant / plot, "loadtest")
                    loadtest.track(run, report.model_copy(update={"outputs": {}}))
            log.info("logged %s:%s", report.stage, report.variant)
    print(f"reports in {dest}; MLflow store: {tracking.tracking_uri()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
