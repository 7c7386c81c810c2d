"""The one logging setup of every entry point (CLI, notebooks, the DVC runner, the load generator).

Libraries never configure logging at import; the program that runs them does, here.
"""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# httpx logs every request at INFO: the load test's /metrics scrape every sample interval would
# bury the step lines.
QUIET = {"httpx": logging.WARNING}


def setup(level: int | str = logging.INFO, force: bool = False) -> None:
    logging.basicConfig(level=level, format=FORMAT, force=force)
    for name, lvl in QUIET.items():
        logging.getLogger(name).setLevel(lvl)
