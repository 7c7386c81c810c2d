"""Stage ``loadtest``: the variants under load, compared in counterbalanced blocks.

    python -m pipelines.run_stage loadtest                          # as DVC runs it (every variant)
    python -m pipelines.run_stage loadtest --variant base           # one variant
    python -m workbench.loadgen --set loadtest.base_url=http://127.0.0.1:8000/v1 \
        --set loadtest.model=smollm2-135m-instruct                  # the CLI: any endpoint, same executor

After guidellm's profiles and strategies (docs/DESIGN.md):

    plan.py      what next: sweep (rates x repeats), knee (a search per arm), concurrency (closed loop
                 at 1 ... N in flight); blocks of every arm once, in a seeded order. Pure.
    arms.py      what is measured: managed vLLM servers, gateway processes, any URL, and
                 loadtest.arms (a managed llama.cpp server, a URL with its key from the env).
    step.py      one step: requests sent, probes read, raw records kept.
    executor.py  ``run(cfg)``: the one executor, for the DVC stage, the notebook and the CLI.
    report.py    each arm's report (written first), its tables, plots and MLflow ``track``.
    compare.py   ``all.json``: the order, the control's drift, arms paired within blocks, gateway arms.

Raw records per step go to ``runs/loadtest/<arm>/step-<point>.jsonl`` as each step ends; reports
to ``reports/loadtest/<arm>.json`` and ``reports/loadtest/all.json``. A pure HTTP client: it
imports no vLLM, torch or lm-eval (tests/test_loadtest.py checks).
"""

from workbench.loadtest.arms import (GATEWAY_SUFFIX, Arm, endpoint, gateway_arm, server_config,  # noqa: F401
                                     start_endpoints)
from workbench.loadtest.executor import Done, execute, run  # noqa: F401
from workbench.loadtest.report import (STAGE, VARIANT, arm_reports, drift_of, markdown,  # noqa: F401
                                       rates_of, read_records, steps_of, table, table_rows, track)
from workbench.reports import Report  # noqa: F401
