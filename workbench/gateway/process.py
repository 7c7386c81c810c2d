"""The gateway as a process of its own, ready (GET /health answers 200) on enter, stopped on exit:
how the load test's gateway arm, the tests and the benchmarks start it.

    with GatewayProcess(Path("gateway.yaml"), free_port(), log_path=Path("gateway.log")) as gw:
        httpx.get(gw.base_url + "/models", headers={"Authorization": f"Bearer {key}"})

``python`` runs another environment's gateway (a venv with only ``workbench[gateway]``); ``cwd`` and
``env`` (PYTHONPATH) another checkout's. A gateway that exits or does not answer in time raises
workbench.net.ServerError with its log's last lines.
"""

from __future__ import annotations

import sys
from pathlib import Path

from workbench.net import ServerProcess


def command(config: Path, port: int, python: str = sys.executable) -> list[str]:
    """``python -m workbench.gateway --config CONFIG --port PORT`` (the port overrides the config's)."""
    return [python, "-m", "workbench.gateway", "--config", str(config), "--port", str(port)]


class GatewayProcess(ServerProcess):
    def __init__(self, config: Path, port: int, *, python: str = sys.executable, **kwargs):
        kwargs.setdefault("name", "gateway")
        super().__init__(command(config, port, python), port, **kwargs)
        self.config = config
