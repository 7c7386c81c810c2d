"""The open-loop step runner and one request function per endpoint (aiohttp, one process).

Open loop: every send time is fixed before the step starts, from the arrival process, and each
request is started by a timer at its absolute time on the monotonic clock. No send waits for
any response, so a slow server shows up as latency, never as a lower offered rate. Each record
keeps the scheduled AND the actual send time: their difference is client lag, reported as such.
Only ``max_concurrency`` (off by default) makes a request wait, and that wait is lag too.

What is timed, as vLLM's ``vllm bench serve`` client (vllm/benchmarks/lib/endpoint_request_func.py)
times it: the clock starts just before the POST; every SSE event whose ``choices`` is non-empty is
a token chunk and gets the arrival time of the network read that carried it; the usage event
(``choices: []``) and ``[DONE]`` are not token chunks. vLLM's chat stream opens with a role-only
chunk (``delta: {"role": "assistant", "content": ""}``) which vLLM's client counts as the first
token; so do we (it is sent together with the first token, in the same engine step).
"""

from __future__ import annotations

import asyncio
import bisect
import math
import threading
import time
from dataclasses import asdict, dataclass, field
import aiohttp

try:  # ~5x faster than json on the small SSE events; the generator works without it
    import orjson

    _loads, _dumps = orjson.loads, orjson.dumps
except ImportError:  # pragma: no cover
    import json

    _loads = json.loads

    def _dumps(obj) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

from workbench.loadgen.workloads import RequestSpec
from workbench.sse import DONE, EventSplitter, split_data

START_LEAD_S = 0.05  # the first arrival fires this long after the step is set up


@dataclass(slots=True)
class Record:
    """One request, raw. Times are seconds on the monotonic clock from the step's start
    (``t0_unix`` is that start on the wall clock, so records from several machines merge)."""

    request_id: str
    step: str
    warmup: bool
    scheduled_s: float
    send_s: float | None = None
    first_token_s: float | None = None  # first token chunk (None: not streamed or failed)
    chunk_s: list[float] = field(default_factory=list)  # every token chunk's arrival
    end_s: float | None = None  # response fully read, or the failure
    prompt_tokens: int | None = None  # from the server's usage
    completion_tokens: int | None = None
    content_chunks: int = 0  # token chunks that carried text (fallback count without usage)
    success: bool = False
    error: str | None = None  # kind: http_503, timeout, connection, no_token, bad_response, ...
    error_detail: str | None = None
    http_status: int | None = None
    streamed: bool = False
    t0_unix: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Target:
    base_url: str  # ends in /v1
    model: str
    endpoint: str = "chat"  # chat | completions | embeddings
    stream: bool = True
    api_key: str | None = None
    ignore_eos: bool = False
    # vLLM's prefix-cache salt: arms on one server (direct and through the gateway) send the same
    # prompts, and without it the second arm's prefills would hit the first arm's cache
    cache_salt: str | None = None


PATHS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}


def build_payload(target: Target, spec: RequestSpec) -> bytes:
    if target.endpoint == "embeddings":
        body = {"model": target.model, "input": spec.prompt}
    else:
        if target.endpoint == "chat":
            body = {"model": target.model, "messages": [{"role": "user", "content": spec.prompt}]}
        else:
            body = {"model": target.model, "prompt": spec.prompt}
        body["max_tokens"] = spec.max_tokens
        if target.ignore_eos:
            body["ignore_eos"] = True
        if target.cache_salt:
            body["cache_salt"] = target.cache_salt
        if target.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}  # usage arrives in the last event
    return _dumps(body)


def _usage(rec: Record, usage: dict | None) -> None:
    if usage:
        rec.prompt_tokens = usage.get("prompt_tokens")
        rec.completion_tokens = usage.get("completion_tokens")


def _read_events(data: bytes, rec: Record, now: float) -> None:
    for payload in split_data(data):
        if payload == DONE:
            continue
        obj = _loads(payload)
        choices = obj.get("choices")
        if choices:
            if rec.first_token_s is None:
                rec.first_token_s = now
            rec.chunk_s.append(now)
            c = choices[0]
            delta = c.get("delta")
            if (delta.get("content") if delta else c.get("text")):
                rec.content_chunks += 1
        elif "usage" in obj:
            _usage(rec, obj["usage"])
        elif "error" in obj:
            rec.error, rec.error_detail = "stream_error", str(obj["error"])[:300]


async def _read_stream(resp: aiohttp.ClientResponse, rec: Record, t0: float) -> None:
    # workbench/sse.py cuts events at any line end (LF, CRLF, CR): splitting on LF alone read a
    # CRLF-framed stream (sse-starlette's default) as one event that never ended: 0 of 1 successes.
    frames = EventSplitter()
    clock = time.perf_counter
    async for data in resp.content.iter_any():
        now = clock() - t0  # one arrival time for every event in this network read
        events = frames.feed(data)
        if events:
            _read_events(events, rec, now)
    rest = frames.rest()  # a last event without its blank line
    if rest:
        _read_events(rest, rec, clock() - t0)
    if rec.error is None and rec.first_token_s is None:
        rec.error = "no_token"  # vLLM: "Never received a valid chunk to calculate TTFT"


async def send(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict,
               rec: Record, t0: float) -> Record:
    """POST one request and fill ``rec``; never raises for a failed request."""
    rec.send_s = time.perf_counter() - t0
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            rec.http_status = resp.status
            if resp.status != 200:
                rec.error = f"http_{resp.status}"
                rec.error_detail = (await resp.text(errors="replace"))[:300]
            elif rec.streamed:
                await _read_stream(resp, rec, t0)
            else:
                _usage(rec, _loads(await resp.read()).get("usage"))
    except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as err:
        rec.error, rec.error_detail = "timeout", repr(err)[:300]
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as err:
        rec.error, rec.error_detail = "connection", repr(err)[:300]
    except ValueError as err:  # JSON that does not parse
        rec.error, rec.error_detail = "bad_response", repr(err)[:300]
    except Exception as err:  # a failed request is a record, whatever went wrong
        rec.error, rec.error_detail = f"other_{type(err).__name__}", repr(err)[:300]
    rec.end_s = time.perf_counter() - t0
    rec.success = rec.error is None
    return rec


def make_session(timeout_s: float) -> aiohttp.ClientSession:
    # limit=0: no connection-pool cap, so the pool never turns an open loop into a closed one.
    # keepalive_timeout 4 s < uvicorn's 5 s (vLLM's server): an idle pooled connection is dropped
    # by us first. Otherwise, at rates below ~0.2 req/s, a request can be written into a socket the
    # server just closed ("Can not write request body", seen at 0.5 req/s Poisson on vLLM-CPU).
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None, force_close=False,
                                       keepalive_timeout=4),
        timeout=aiohttp.ClientTimeout(total=timeout_s), auto_decompress=False)


def step_label(rate: float) -> str:
    return "rate_inf" if math.isinf(rate) else f"rate_{rate:g}"


async def run_step(session: aiohttp.ClientSession, target: Target, specs: list[RequestSpec],
                   offsets: list[float], step: str, warmup: int = 0,
                   max_concurrency: int | None = None, window=None) -> list[Record]:
    """Send ``specs[i]`` at ``offsets[i]`` seconds from now (+ START_LEAD_S); return every record,
    the first ``warmup`` marked as warm-up. Waits for the last response (or its timeout).

    ``window`` (optional; workbench/loadtest/step.py's ``LatencyWindow``) decides while the step
    runs where its warm-up and its measurement end: ``await window.watch(records, clock)`` returns
    (warm-up end, end) in seconds from the step's zero. Arrivals from the end on are never sent
    (their records are dropped); those before the warm-up's end are marked warm-up. ``offsets``
    must then be sorted."""
    if len(specs) != len(offsets):
        raise ValueError("one offset per request")
    url = target.base_url.rstrip("/") + PATHS[target.endpoint]
    # identity: aiohttp would otherwise offer gzip, which a gateway honours for SSE, and this
    # client reads raw bytes (auto_decompress=False keeps decoding off the hot path).
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
    if target.api_key:
        headers["Authorization"] = f"Bearer {target.api_key}"
    streamed = target.stream and target.endpoint != "embeddings"
    bodies = [build_payload(target, s) for s in specs]  # all serialization before the clock runs
    records = [Record(f"{step}-{i}", step, i < warmup, float(at), streamed=streamed)
               for i, at in enumerate(offsets)]
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    tasks: list[asyncio.Task] = []
    all_fired = loop.create_future()

    async def capped(i: int) -> Record:
        async with sem:
            return await send(session, url, bodies[i], headers, records[i], t0)

    cut = [len(records)]  # arrivals sent: all, unless the window ends the step sooner

    def fire(i: int) -> None:
        if i >= cut[0]:
            return
        if sem is None:
            tasks.append(loop.create_task(send(session, url, bodies[i], headers, records[i], t0)))
        else:
            tasks.append(loop.create_task(capped(i)))
        if len(tasks) >= cut[0] and not all_fired.done():
            all_fired.set_result(None)

    # The step's zero on both clocks: perf_counter for records, loop.time() for the timers.
    # uvloop's clock and timers count whole milliseconds (loop.time() is up to 1 ms behind), so
    # its timers are set 1 ms later: a request may then go up to ~1 ms late, never early.
    granularity_s = 0.001 if type(loop).__module__.startswith("uvloop") else 0.0
    t0 = time.perf_counter() + START_LEAD_S
    loop_t0 = loop.time() + START_LEAD_S + granularity_s
    t0_unix = time.time() + START_LEAD_S
    for rec in records:
        rec.t0_unix = t0_unix
    handles = [loop.call_at(loop_t0 + at, fire, i) for i, at in enumerate(offsets)]
    watcher = None
    if window is not None and records:
        def decided(task: asyncio.Task) -> None:
            if task.cancelled() or task.exception() is not None:
                return  # raised below, from the task
            warm_end, end = task.result()
            cut[0] = max(bisect.bisect_left(offsets, end), len(tasks))
            for h in handles[cut[0]:]:
                h.cancel()
            for rec in records[:cut[0]]:
                rec.warmup = rec.scheduled_s < warm_end
            if len(tasks) >= cut[0] and not all_fired.done():
                all_fired.set_result(None)

        watcher = loop.create_task(window.watch(records, lambda: time.perf_counter() - t0))
        watcher.add_done_callback(decided)
    if records:
        await all_fired
        await asyncio.gather(*tasks)
    if watcher is not None:
        if not watcher.done():
            watcher.cancel()
        elif watcher.exception() is not None:
            raise watcher.exception()
    return records[:cut[0]]


def run_async(coro):
    """Run a coroutine to completion on uvloop when installed (asyncio otherwise), in a worker
    thread when this thread already runs a loop (a Jupyter kernel does)."""
    try:
        import uvloop

        new_loop = uvloop.new_event_loop
    except ImportError:
        new_loop = asyncio.new_event_loop

    def go():
        loop = new_loop()
        try:
            return loop.run_until_complete(coro)
        finally:
            loop.close()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return go()
    box: dict = {}

    def worker():
        try:
            box["value"] = go()
        except BaseException as err:
            box["error"] = err

    t = threading.Thread(target=worker, name="loadgen")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
