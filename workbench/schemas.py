"""JSON Schemas of the stage reports, generated from their typed models, so that other tools can
read reports/<stage>/<variant>.json without this package:

    python -m workbench.schemas --out docs/schemas      # write <name>.json for every report below
    python -m workbench.schemas --check docs/schemas    # exit 1 when a committed schema is stale

tests/test_schemas.py fails when docs/schemas/ differs from the models: regenerate and commit.
``common`` is the envelope every report shares (provenance, config, metrics, outputs); each stage's
file adds its typed ``details``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from workbench.evaluate.details import EvaluateReport
from workbench.loadtest.details import LoadtestComparedReport, LoadtestReport
from workbench.prepare import PrepareReport
from workbench.quantize.details import QuantizeReport
from workbench.report_details import FinalReport
from workbench.reports import SCHEMA_VERSION, Report
from workbench.shard import ShardReport
from workbench.speed import SpeedReport

log = logging.getLogger(__name__)

# file name -> (model, which reports it describes)
REPORTS: dict[str, tuple[type[Report], str]] = {
    "common": (Report, "every stage report, details untyped (each stage's file types them)"),
    "prepare": (PrepareReport, "reports/prepare/base.json"),
    "quantize": (QuantizeReport, "reports/quantize/<variant>.json"),
    "shard": (ShardReport, "reports/shard/<variant>.json"),
    "evaluate": (EvaluateReport, "reports/evaluate/<variant>.json"),
    "loadtest": (LoadtestReport, "reports/loadtest/<arm>.json"),
    "loadtest-all": (LoadtestComparedReport, "reports/loadtest/all.json"),
    "speed": (SpeedReport, "reports/speed/summary.json"),
    "report": (FinalReport, "reports/report/all.json"),
}


def schema(name: str) -> dict:
    """The JSON Schema of report ``name`` (as written: serialization mode)."""
    model, what = REPORTS[name]
    out = model.model_json_schema(mode="serialization")
    out["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    out["description"] = f"{what}; schema_version {SCHEMA_VERSION}. " + (out.get("description") or "")
    return out


def render(name: str) -> str:
    return json.dumps(schema(name), indent=2, sort_keys=True) + "\n"


def stale(folder: Path) -> list[str]:
    """The schema files under ``folder`` that are missing or differ from the models."""
    return [f"{n}.json" for n in REPORTS
            if not (folder / f"{n}.json").is_file() or (folder / f"{n}.json").read_text() != render(n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workbench.schemas", description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", type=Path, help="write the schemas into this folder")
    g.add_argument("--check", type=Path, help="compare this folder with the models")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.check:
        bad = stale(args.check)
        for name in bad:
            log.error("%s is stale: run python -m workbench.schemas --out %s", args.check / name, args.check)
        return 1 if bad else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name in REPORTS:
        (args.out / f"{name}.json").write_text(render(name))
        log.info("wrote %s", args.out / f"{name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
