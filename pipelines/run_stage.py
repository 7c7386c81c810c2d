"""Run one stage as DVC does: validate params, execute its notebook with papermill, track it.

    python -m pipelines.run_stage prepare
    python -m pipelines.run_stage evaluate --variant awq-int4 --set evaluate.limit=5

The notebook gets the stage's section of params.yaml as its ``config`` parameter (and ``variant``),
runs the stage's ``run(cfg)``, which writes the report. The executed copy is written beside its
final place and renamed in only on success; a failed run keeps it under runs/failed/ for reading.
The stage's MLflow run is open while the notebook executes (system metrics), and afterwards
receives the report and the executed notebook.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from workbench import logconfig
from workbench.config import ConfigError, load_params
from workbench.stages import STAGES, run_tracked

log = logging.getLogger("pipelines.run_stage")

EXECUTED_DIR = Path("runs/notebooks")
FAILED_DIR = Path("runs/failed")


def executed_path(stage: str, variant: str | None) -> Path:
    stem = Path(STAGES[stage].notebook).stem
    return EXECUTED_DIR / (f"{stem}-{variant}.ipynb" if variant else f"{stem}.ipynb")


def export_html(notebook: Path, dest: Path) -> Path:
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nbformat.read(notebook, as_version=4))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial")
    tmp.write_text(body, encoding="utf-8")
    os.replace(tmp, dest)
    log.info("notebook exported to %s", dest)
    return dest


def run_notebook(stage: str, variant: str | None, params_file: str, overrides: list[str]) -> Path:
    """Execute the stage's notebook on its config (``variant`` sets ``<section>.variant``) inside
    the stage's tracked run (workbench.stages.run_tracked)."""
    import papermill

    spec = STAGES[stage]
    params = load_params(params_file, [*overrides, *spec.variant_overrides(variant)])  # a typo stops here
    out = executed_path(stage, variant)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")

    def execute(cfg) -> None:  # the notebook writes the report; run_tracked reads it back
        try:
            papermill.execute_notebook(
                str(Path("notebooks") / spec.notebook), str(partial),
                parameters={"config": cfg.model_dump(mode="json")},
                kernel_name=spec.kernel, cwd=str(Path.cwd()), log_output=True, progress_bar=False,
            )
        except BaseException:
            FAILED_DIR.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                kept = FAILED_DIR / out.name
                os.replace(partial, kept)
                log.error("stage %s failed; executed notebook kept at %s", stage, kept)
            raise
        os.replace(partial, out)
        if spec.html:
            export_html(out, Path(spec.html))

    run_tracked(stage, params, execute, artifacts=[out])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--variant", default=None, help="model variant, for stages that fan out")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. prepare.dtype=float32")
    args = parser.parse_args(argv)
    logconfig.setup()
    try:
        out = run_notebook(args.stage, args.variant, args.params, args.set)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log.info("executed notebook: %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
