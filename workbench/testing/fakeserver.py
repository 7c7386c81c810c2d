"""A fake OpenAI-compatible server (a test double) with a chosen TTFT, inter-token delay and length.

For tests and benchmarks only: no model is behind it, and nothing in the pipeline uses it.

    python -m workbench.testing.fakeserver --port 8099 --ttft-ms 50 --itl-ms 5 --output-tokens 32

Serves /v1/models, /v1/chat/completions and /v1/completions (SSE with ``stream_options.
include_usage`` like vLLM: a role-only first chat chunk, one chunk per token, a finish chunk, a
usage chunk with ``choices: []``, then ``[DONE]``; or one JSON body), /v1/embeddings, /health and
a tiny Prometheus /metrics with vLLM's names for the TTFT histogram, the running / waiting /
KV-cache gauges and the preemption and prefix-cache counters (a prompt seen before with the same
``cache_salt`` counts as all hits: a crude prefix cache, enough to tell repeated prompts from unique ones). Every reply has
``min(max_tokens, output_tokens)`` tokens, or with ``answers`` the next of those texts (non-streamed
chat). ``--fail-every N`` answers every Nth request with 503; ``api_key`` makes it ask for a key.

It is the target of the load generator's unit tests and of benchmarks/loadgen_peers.py at
1,000 req/s, so the per-request work is small: chunk bytes are built once per reply length.
In code: ``with FakeServer(ttft_ms=50) as fake: fake.base_url`` (a background thread), or
``FakeServerProcess(...)`` (a subprocess, for load that should not share our GIL).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
from dataclasses import asdict

from aiohttp import web

from workbench.net import LocalServer, ServerProcess, free_port
from workbench.testing.fakeapp import EOLS, Fake, FakeOptions


class FakeServer(LocalServer):
    """The fake server on a free port in a background thread of this process (tests)."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, **opts):
        self.opts = FakeOptions(**opts)
        self.host, self.port = host, port or free_port(host)
        self.fake = Fake(self.opts)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        runner = web.AppRunner(self.fake.app(), access_log=None)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, self.host, self.port, backlog=4096).start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())
        self._loop.close()

    def __enter__(self) -> "FakeServer":
        self._thread = threading.Thread(target=self._serve, name="fakeserver", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake server did not start")
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def fake_endpoints(monkeypatch, fakes: dict[str, FakeServer]) -> list[str]:
    """The load test's managed vLLM servers (``workbench.loadtest.arms.endpoint``) replaced, through
    pytest's ``monkeypatch``, by ``fakes`` ({variant: FakeServer}); returns the list of variants
    whose server was started, in order, as the run fills it."""
    import contextlib

    from workbench.loadtest import arms

    started: list[str] = []
    real = arms.endpoint  # names without a fake (a URL or llama.cpp arm) reach their real endpoint

    @contextlib.contextmanager
    def endpoint(cfg, variant, log_dir):
        started.append(variant)
        if variant not in fakes:
            with real(cfg, variant, log_dir) as up:
                yield up
            return
        with fakes[variant] as fake:
            yield fake.base_url, {"managed": True, "base_url": fake.base_url}

    monkeypatch.setattr(arms, "endpoint", endpoint)
    return started


class FakeServerProcess(ServerProcess):
    """The fake server as a subprocess (``python -m workbench.testing.fakeserver``), ready on enter."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, **opts):
        self.opts = FakeOptions(**opts)
        port = port or free_port(host)
        args = [sys.executable, "-m", "workbench.testing.fakeserver", "--host", host, "--port", str(port)]
        for key, value in asdict(self.opts).items():
            if key == "answers":
                args += [a for text in value for a in ("--answer", text)]
            elif value is not None:
                args += [f"--{key.replace('_', '-')}", str(value)]
        super().__init__(args, port, host=host, name="fake server", timeout_s=20, interval_s=0.05)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8099)
    d = FakeOptions()
    p.add_argument("--ttft-ms", type=float, default=d.ttft_ms)
    p.add_argument("--itl-ms", type=float, default=d.itl_ms)
    p.add_argument("--output-tokens", type=int, default=d.output_tokens)
    p.add_argument("--model", default=d.model)
    p.add_argument("--fail-every", type=int, default=d.fail_every)
    p.add_argument("--max-running", type=int, default=d.max_running,
                   help="generations at once (0: unlimited); more queue, which shows as TTFT")
    p.add_argument("--embedding-dim", type=int, default=d.embedding_dim)
    p.add_argument("--answer", action="append", default=[], help="a chat reply, in turn (repeat for more)")
    p.add_argument("--api-key", default=None, help="ask for this key (401 without it)")
    p.add_argument("--line-ending", choices=sorted(EOLS), default=d.line_ending, help="SSE line end")
    a = p.parse_args(argv)
    opts = FakeOptions(ttft_ms=a.ttft_ms, itl_ms=a.itl_ms, output_tokens=a.output_tokens, model=a.model,
                       fail_every=a.fail_every, max_running=a.max_running, embedding_dim=a.embedding_dim,
                       answers=tuple(a.answer), api_key=a.api_key,
                       line_ending=a.line_ending)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(Fake(opts).app(), host=a.host, port=a.port, access_log=None, print=None, backlog=4096)


if __name__ == "__main__":
    main()
