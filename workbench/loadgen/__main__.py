"""The load test from the shell, on the stage's own executor and config: params.yaml's
``loadtest`` section, with ``--set key=value`` over it (precedence: --set > params.yaml > defaults;
an unknown key fails and is named). Prints each arm's steps (every figure with its interval) as
JSON; reports and raw records go where the stage writes them (``reports/loadtest``,
``loadtest.out_dir``)::

    python -m workbench.loadgen --set base_url=http://127.0.0.1:8000/v1 --set model=smollm2-135m-instruct \
        --set 'rates=[1, 2]' --set repeats=1
    python -m workbench.loadgen --set mode=concurrency --set 'concurrencies=[1, 2, 4]' --variant base

A key may be given with or without its section (``loadtest.rates=[1]`` or ``rates=[1]``). With
``base_url`` set and no ``--variant``, the arm is named ``endpoint``; without ``base_url``, the
variants' managed vLLM servers are started as in the stage (``--variant`` picks one).
"""

from __future__ import annotations

import argparse
import json
import sys

from workbench import logconfig
from workbench.config import PARAMS_FILE, ConfigError, load_params

SECTION = "loadtest"


def overrides(sets: list[str]) -> list[str]:
    """``--set`` values as load_params overrides, each under the ``loadtest`` section."""
    return [s if s.startswith(f"{SECTION}.") else f"{SECTION}.{s}" for s in sets]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workbench.loadgen", description=__doc__.splitlines()[0])
    p.add_argument("--params", default=PARAMS_FILE, help="the params file (its loadtest section)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a loadtest key over params.yaml (YAML value), repeatable")
    p.add_argument("--variant", default=None, help="one variant / arm name (default: every loadtest.variants "
                                                   "entry, or 'endpoint' when base_url is set)")
    a = p.parse_args(argv)
    logconfig.setup()  # to stderr: stdout carries the JSON
    try:
        cfg = load_params(a.params, overrides(a.sets)).loadtest
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from workbench import loadtest  # the one executor (workbench/loadtest/executor.py)

    variant = a.variant or ("endpoint" if cfg.base_url else None)
    report = loadtest.run(cfg, variant)
    steps = [s.model_dump(mode="json") for r in loadtest.report.arm_reports(report) for s in loadtest.steps_of(r)]
    print(json.dumps(steps, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
