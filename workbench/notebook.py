"""What every stage notebook does first: find the project root and show log lines in cell output."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from workbench import logconfig

MARKERS = ("dvc.yaml", "params.yaml")


def project_root(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` holding dvc.yaml; the cwd if none does."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if any((folder / m).exists() for m in MARKERS):
            return folder
    return here


def setup(level: int = logging.INFO) -> Path:
    """chdir to the project root (JupyterLab starts kernels in notebooks/) and turn on logging."""
    root = project_root()
    os.chdir(root)
    logconfig.setup(level, force=True)
    return root
