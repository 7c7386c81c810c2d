"""A managed llama.cpp server on a GGUF file: the CPU engine a user would pick instead of vLLM.

    python -m workbench.llamacpp --model path/to/model.gguf --port 8081      # serve until Ctrl-C

    with LlamaCppServer(LlamaCppConfig()) as server:     # in code: the embedded default's GGUF
        client = openai.OpenAI(base_url=server.base_url, api_key="none")

The server is llama.cpp's own C++ HTTP server (``tools/server``: ``/health``, ``/v1/models``,
``/v1/chat/completions`` with SSE, ``/v1/completions``, ``/metrics``), as the ``xllamacpp`` wheel
ships it prebuilt (PyPI, manylinux2014 x86-64, no dependencies; ``./setup.sh`` installs it from
requirements/main.lock in ~3 s, where llama-cpp-python builds from source for ~6 min). The wheel
runs the server on a thread inside Python, so ``main`` below is the process
``LlamaCppServer`` starts, health-checks and stops like vLLM's (``workbench.managed``).

Prompt log-probabilities: llama.cpp's ``/v1/completions`` returns log-probs of generated tokens
only and ignores ``echo`` (llama.cpp issue 27174, open 2026-08; PRs 15189 and 17935 unmerged), so
perplexity and lm-eval's log-likelihood scoring are not available from this engine;
``workbench.evaluate.chat`` scores it through chat completions instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from workbench.config import LlamaCppConfig
from workbench.managed import ManagedServer

log = logging.getLogger(__name__)


def model_path(spec: str) -> Path:
    """``pkg:<package>/<file>`` -> the file inside the installed package (as prepare resolves it);
    a path is taken as it is: a missing file is the server's to report (its log says so)."""
    if spec.startswith("pkg:"):
        from workbench.sources import package_path

        return package_path(spec)
    return Path(spec).expanduser()


def build_command(cfg: LlamaCppConfig, path: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "workbench.llamacpp", "--model", str(path), "--alias", cfg.model_name,
            "--host", cfg.host, "--port", str(port), "--threads", str(cfg.threads or os.cpu_count() or 1),
            "--ctx-size", str(cfg.ctx_size), "--parallel", str(cfg.parallel), "--seed", str(cfg.seed)]


class LlamaCppServer(ManagedServer):
    """One llama.cpp server process on ``cfg.model``."""

    kind = "llama.cpp"

    def __init__(self, cfg: LlamaCppConfig, log_path: Path | None = None):
        self.cfg = cfg
        self.model_path = model_path(cfg.model)
        super().__init__(cfg.host, cfg.port, log_path, startup_timeout_s=cfg.startup_timeout_s,
                         shutdown_grace_s=cfg.shutdown_grace_s, log_prefix=f"llamacpp-{cfg.model_name}")

    api_key = None  # the managed server is bound to the loopback and asks for none

    @property
    def served_name(self) -> str:
        return self.cfg.model_name

    @property
    def label(self) -> str:
        return str(self.model_path)

    def command(self) -> list[str]:
        return build_command(self.cfg, self.model_path, self.port)


# --- the server process ---------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m workbench.llamacpp", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="GGUF file")
    p.add_argument("--alias", default=None, help="served model name (default: the file's stem)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--ctx-size", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--parallel", type=int, default=1, help="sequences decoded together (slots)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM / SIGINT. Exit codes: 2 model file missing, 3 xllamacpp missing, 4 the
    server did not start (its reason is logged just above)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    path = Path(args.model)
    if not path.is_file():
        log.error("GGUF model file not found: %s", path)
        return 2
    try:
        import xllamacpp
    except ImportError as err:
        log.error("xllamacpp (llama.cpp's server, prebuilt) is not installed: %s; ./setup.sh installs it "
                  "from requirements/main.lock", err)
        return 3
    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    alias = args.alias or path.stem
    params.model_alias = {alias}  # a set of names the server answers to
    params.hostnames = [args.host]
    params.port = args.port
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.n_parallel = args.parallel
    # llama.cpp's n_ctx is the whole KV cache, split evenly over the slots.
    params.n_ctx = args.ctx_size * args.parallel
    params.sampling.seed = args.seed
    params.endpoint_metrics = True  # /metrics (Prometheus), as vLLM has
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server = xllamacpp.Server(params)  # loads the model, then serves on a thread
    except Exception as err:  # a file llama.cpp cannot load, a port in use, ...
        log.error("llama.cpp server did not start on %s: %s: %s", path, type(err).__name__, err)
        return 4
    log.info("llama.cpp %s serving %s at %s (threads %d, %d x %d tokens)", xllamacpp.__version__,
             alias, server.listening_address, args.threads, args.parallel, args.ctx_size)
    stop.wait()
    del server  # joins the server's threads
    log.info("llama.cpp server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
