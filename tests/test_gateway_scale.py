"""Gateway scale-out: limits shared through a real redis-server (across gateway processes and
across the workers of one), `workers: N`, and upstream pools (least outstanding requests,
health checks, ejection and return) with real fake-server processes killed and restarted."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from gateway_helpers import AUTH, KEY, METRICS_AUTH, ROOT, make_cfg
from workbench.gateway import process
from workbench.net import free_port
from workbench.testing.fakeserver import FakeServer, FakeServerProcess
from workbench.gateway.config import GatewayConfig, GatewayConfigError, UpstreamConfig, load_config
from workbench.gateway.keys import KeyStore, hash_key
from workbench.gateway.pool import Pool
from workbench.gateway.server import GatewayServer
from workbench.gateway.store import MemoryStore, RedisStore
from workbench.promscrape import parse, total

CHAT = {"model": "fake-model", "max_tokens": 4, "messages": [{"role": "user", "content": "hello there"}]}


_prefixes = iter(range(10**6))


def redis_limits(redis_url: str) -> dict:
    """A limits section on the test Redis, under a prefix of its own (tests share one server)."""
    return {"backend": "redis", "redis_url": redis_url, "redis_prefix": f"t{next(_prefixes)}-{os.getpid()}:"}


class GatewayProcess(process.GatewayProcess):
    """``python -m workbench.gateway`` with a config file, ready (GET /health) on enter."""

    def __init__(self, cfg: GatewayConfig, tmp_path: Path, name: str = "gw"):
        port = cfg.port if cfg.port != 8080 else free_port()
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg.model_copy(update={"port": port}).model_dump(mode="json")))
        super().__init__(path, port, name=f"gateway {name}", cwd=ROOT, timeout_s=30, grace_s=20)

    def chat(self) -> int:
        return httpx.post(self.root_url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=30).status_code


# ---- the store seam, in-process and Redis ----------------------------------------------------
def _key(rpm=None, tpm=None):
    cfg = {"id": "k", "sha256": hash_key(KEY)}
    if rpm:
        cfg["requests_per_minute"] = rpm
    if tpm:
        cfg["tokens_per_minute"] = tpm
    return KeyStore([make_cfg(Path("/nonexistent"), {}, cfg).keys[0]]).lookup(f"Bearer {KEY}".encode())


def test_memory_store_refusal_takes_nothing_from_the_other_bucket():
    store, key = MemoryStore(), _key(rpm=5, tpm=100)
    asyncio.run(store.debit(key, 150))  # tokens overdrawn: refused on tokens ...
    adm = store.admit_now(key)
    assert adm.limit == "tokens" and adm.wait_s == pytest.approx(50 * 60 / 100 / 1, rel=0.05)
    assert key.requests.level == pytest.approx(5, abs=0.01)  # ... and no request unit was spent


def test_memory_store_reservation_is_taken_at_admission():
    store, key = MemoryStore(), _key(tpm=100)
    assert store.admit_now(key, reserve=60).limit is None
    assert store.admit_now(key, reserve=60).limit == "tokens"  # 40 left: the second cannot reserve 60
    asyncio.run(store.debit(key, -60))  # the first used nothing: its reservation comes back
    assert store.admit_now(key, reserve=60).limit is None


def test_redis_store_admits_exactly_rpm_across_two_clients_under_concurrency(redis_url):
    limits = GatewayConfig.model_validate({"limits": redis_limits(redis_url)}).limits
    key = _key(rpm=10)

    async def run():
        a, b = RedisStore(limits), RedisStore(limits)  # two gateways' connections
        await a.start()
        res = await asyncio.gather(*((a if i % 2 else b).admit(key) for i in range(40)))
        await a.aclose()
        await b.aclose()
        return res

    res = asyncio.run(run())
    assert sum(r.limit is None for r in res) == 10
    refused = [r for r in res if r.limit is not None]
    assert {r.limit for r in refused} == {"requests"} and all(0 < r.wait_s <= 6 for r in refused)


def test_redis_store_tokens_debited_by_one_gateway_refuse_at_the_other(redis_url):
    limits = GatewayConfig.model_validate({"limits": redis_limits(redis_url)}).limits
    key = _key(tpm=100)

    async def run():
        a, b = RedisStore(limits), RedisStore(limits)
        first = await a.admit(key, reserve=30)
        await a.debit(key, 90)  # settled: 30 reserved + 90 used = 120 of 100
        second = await b.admit(key)
        await b.revoke("k")
        third = await a.admit(_key(rpm=1000))
        await b.unrevoke("k")
        await a.aclose()
        await b.aclose()
        return first, second, third

    first, second, third = asyncio.run(run())
    assert first.limit is None
    assert second.limit == "tokens" and second.wait_s == pytest.approx(20 * 60 / 100, rel=0.05)
    assert third.limit == "revoked"


def test_token_reservations_are_shared_across_gateways_and_settled_back(redis_url):
    """The data path's reserve-then-settle (max_tokens taken at admission, the unused part given
    back) holds across gateways in Redis mode, as it does in one process (MemoryStore)."""
    limits = GatewayConfig.model_validate({"limits": redis_limits(redis_url)}).limits

    async def run(a, b):
        key = _key(tpm=60)
        first = await a.reserve(key, 40)
        second = await b.reserve(key, 40)  # 20 left: refused, nothing taken
        await a.debit(key, -30)  # the first used 10 of its 40
        third = await b.reserve(key, 40)  # 50 left
        return first, second, third

    async def redis_run():
        a, b = RedisStore(limits), RedisStore(limits)
        try:
            return await run(a, b)
        finally:
            await a.aclose()
            await b.aclose()

    mem = MemoryStore()
    for first, second, third in (asyncio.run(redis_run()), asyncio.run(run(mem, mem))):
        assert first.limit is None and third.limit is None
        assert second.limit == "tokens" and second.wait_s == pytest.approx(20 * 60 / 60, rel=0.05)


# ---- configuration ---------------------------------------------------------------------------
def test_workers_above_one_without_redis_is_a_clear_config_error(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump({"workers": 2}))
    with pytest.raises(GatewayConfigError, match="workers: 2 needs limits.backend: redis"):
        load_config(path)
    path.write_text(yaml.safe_dump({"workers": 2, "limits": {"backend": "redis"}}))
    assert load_config(path).workers == 2


def test_a_pool_is_a_list_of_base_urls():
    up = UpstreamConfig(base_url=["http://a:8000/v1/", "http://b:8000/v1"])
    assert up.urls == ["http://a:8000/v1", "http://b:8000/v1"]
    assert UpstreamConfig(base_url="http://a:8000/v1").urls == ["http://a:8000/v1"]
    with pytest.raises(ValueError):
        UpstreamConfig(base_url=[])


# ---- gateways sharing Redis ------------------------------------------------------------------
@pytest.fixture(scope="module")
def fake():
    with FakeServer(output_tokens=4) as f:
        yield f


def test_two_gateway_processes_enforce_one_keys_rpm_jointly(fake, redis_url, tmp_path):
    limits = redis_limits(redis_url)
    cfgs = [make_cfg(tmp_path / n, {"fake-model": fake.base_url}, key={"requests_per_minute": 10},
                     limits=limits, audit={"path": str(tmp_path / f"audit-{n}.sqlite")}) for n in "ab"]
    with GatewayProcess(cfgs[0], tmp_path, "a") as a, GatewayProcess(cfgs[1], tmp_path, "b") as b:
        t0 = time.monotonic()
        codes = [(a if i % 2 else b).chat() for i in range(20)]
        refilled = (time.monotonic() - t0) * 10 / 60  # the bucket refills as the requests go
    assert set(codes) == {200, 429} and 10 <= codes.count(200) <= 10 + refilled, codes


def test_redis_down_refuses_with_503_unless_fail_open(fake, tmp_path):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    cfg = make_cfg(tmp_path, {"fake-model": fake.base_url}, key={"requests_per_minute": 10},
                   limits={"backend": "redis", "redis_url": dead, "redis_timeout_s": 0.2})
    with pytest.raises(RuntimeError, match="did not start"):  # it says so at start
        with GatewayServer(cfg):
            pass
    gw = GatewayServer(cfg)
    gw.app.store.start = _noop  # Redis goes away after a good start
    with gw:
        r = httpx.post(gw.base_url + "/chat/completions", json=CHAT, headers=AUTH, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "limits_unavailable"
    cfg = make_cfg(tmp_path, {"fake-model": fake.base_url}, key={"requests_per_minute": 10},
                   limits={"backend": "redis", "redis_url": dead, "redis_timeout_s": 0.2, "redis_fail_open": True})
    gw = GatewayServer(cfg)
    gw.app.store.start = _noop
    with gw:
        assert httpx.post(gw.base_url + "/chat/completions", json=CHAT, headers=AUTH, timeout=30).status_code == 200


async def _noop():
    pass


def test_two_workers_on_one_port_share_the_limit_through_redis(fake, redis_url, tmp_path):
    cfg = make_cfg(tmp_path, {"fake-model": fake.base_url}, key={"requests_per_minute": 12},
                   limits=redis_limits(redis_url)).model_copy(update={"workers": 2})
    with GatewayProcess(cfg, tmp_path) as gw:
        workers = [w for w in psutil.Process(gw.proc.pid).children()  # not multiprocessing's tracker
                   if "spawn_main" in " ".join(w.cmdline())]
        assert len(workers) == 2
        # Bytes each worker read (sockets included), not its CPU: a worker's share of 36 requests
        # is ~0.01 s of CPU, one clock tick, so a CPU bar failed 3 runs in 4 with both serving.
        # Seen: idle ~70 B in 1.5 s; serving ~100-150 KB each (request, upstream reply, Redis).
        read0 = [w.io_counters().read_chars for w in workers]
        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as ex:  # fresh connections, several at once: both workers accept
            codes = list(ex.map(lambda _: gw.chat(), range(36)))
        refilled = (time.monotonic() - t0) * 12 / 60
        busy = sum(w.io_counters().read_chars - r0 > 10_000 for w, r0 in zip(workers, read0))
    assert set(codes) == {200, 429} and 12 <= codes.count(200) <= 12 + refilled, codes  # not 2 x 12
    assert busy >= 2  # both workers served requests


def test_workers_start_on_an_audit_database_already_made_and_in_wal_mode(redis_url, tmp_path, monkeypatch):
    """Workers opening a fresh audit database at once: one could find it locked while another put
    it in WAL mode, and die at start (seen: 3 of 80 such opens; a load test's gateway lost a worker).
    The supervisor makes it once before it starts them."""
    import sqlite3

    from uvicorn.supervisors import Multiprocess

    from workbench.gateway import workers
    from workbench.gateway.server import uvicorn_config

    cfg = make_cfg(tmp_path, {"fake-model": "http://127.0.0.1:9/v1"}, limits=redis_limits(redis_url))
    cfg = cfg.model_copy(update={"workers": 3, "port": free_port()})
    seen = {}

    def run(self):  # where the workers would start: what the audit database is by then
        path = Path(cfg.audit.path)
        seen["exists"] = path.exists()
        if path.exists():
            seen["journal_mode"] = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]

    monkeypatch.setattr(Multiprocess, "run", run)
    workers.serve_workers(cfg, uvicorn_config)
    assert seen == {"exists": True, "journal_mode": "wal"}


# ---- upstream pools --------------------------------------------------------------------------
def _pool(n=3, **kw):
    return Pool("m", UpstreamConfig(base_url=[f"http://r{i}:8000/v1" for i in range(n)], **kw))


def test_pool_sends_to_the_replica_with_fewest_outstanding_requests():
    pool = _pool()
    a, b, c = pool.replicas
    for _ in range(3):
        pool.begin(a)
    pool.begin(b)
    assert pool.pick() is c
    pool.begin(c)
    pool.begin(c)
    assert pool.pick() is b
    pool.done(a)
    pool.done(a)  # a: 1, b: 1, c: 2
    assert {pool.pick().url for _ in range(4)} == {a.url, b.url}


def test_pool_ties_rotate_and_ejected_replicas_get_nothing_until_they_pass_checks():
    pool = _pool(unhealthy_after=2, healthy_after=2, eject_s=0)
    a, b, c = pool.replicas
    assert {pool.pick().url for _ in range(3)} == {a.url, b.url, c.url}
    pool.observe(a, False)
    assert a.healthy  # one failed check is not enough
    pool.observe(a, False)
    pool.connect_failed(b)  # a refused connection ejects at once
    assert not a.healthy and not b.healthy and {pool.pick().url for _ in range(6)} == {c.url}
    pool.observe(a, True)
    assert not a.healthy
    pool.observe(a, True)
    assert a.healthy and a.url in {pool.pick().url for _ in range(6)}
    pool.observe(c, False)
    pool.observe(c, False)
    pool.observe(a, False)
    pool.observe(a, False)  # all ejected: all are tried again rather than refusing
    assert {pool.pick().url for _ in range(6)} == {a.url, b.url, c.url}


class Load:
    """A closed loop of chat requests in threads until stopped: (send time, status) of each; a
    broken connection is status 0."""

    def __init__(self, url: str, concurrency: int):
        self.url, self.results = url, []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._worker, daemon=True) for _ in range(concurrency)]

    def _worker(self):
        with httpx.Client(timeout=30) as c:
            while not self._stop.is_set():
                t = time.monotonic()
                try:
                    self.results.append((t, c.post(self.url, json=CHAT, headers=AUTH).status_code))
                except httpx.HTTPError:
                    self.results.append((t, 0))

    def sent_after(self, t: float) -> int:
        return sum(1 for ts, _ in list(self.results) if ts > t)

    def wait_for(self, n: int, after: float = 0.0, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while self.sent_after(after) < n and time.monotonic() < deadline:
            time.sleep(0.05)

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(60)


def test_pool_survives_a_replica_killed_mid_load_and_takes_it_back(tmp_path):
    port_a = free_port()
    with FakeServerProcess(port=port_a, ttft_ms=20, output_tokens=4) as a, \
            FakeServerProcess(ttft_ms=20, output_tokens=4) as b:
        cfg = make_cfg(tmp_path, {"fake-model": [a.base_url, b.base_url]})
        pool = cfg.upstreams["fake-model"].model_copy(update={"health_interval_s": 0.2})
        cfg = cfg.model_copy(update={"upstreams": {"fake-model": pool}})
        with GatewayServer(cfg) as gw:
            url = gw.base_url + "/chat/completions"
            grace_s = 0.5  # requests in flight on the killed replica may fail
            with Load(url, 6) as load:
                load.wait_for(30)
                killed_at = time.monotonic()
                a.proc.kill()  # SIGKILL: no goodbye, connections just break
                a.proc.wait()
                load.wait_for(60, after=killed_at + grace_s)
            before = [s for t, s in load.results if t < killed_at]
            after = [s for t, s in load.results if t > killed_at + grace_s]
            assert before.count(200) >= 30
            assert len(after) >= 60 and after.count(200) == len(after), \
                [(round(t - killed_at, 3), s) for t, s in load.results if s != 200]
            m = parse(httpx.get(gw.root_url + "/metrics", headers=METRICS_AUTH).text)
            assert total(m, "workbench_gateway_upstream_replica_healthy", replica=a.base_url) == 0

            with FakeServerProcess(port=port_a, ttft_ms=20, output_tokens=4) as a2:  # back on its port
                replica_a = gw.app.upstreams.pools["fake-model"].replicas[0]
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and not replica_a.healthy:
                    time.sleep(0.1)
                assert replica_a.healthy
                with Load(url, 4) as load:
                    load.wait_for(40)
                assert all(s == 200 for _, s in load.results)
                served = parse(httpx.get(a2.root_url + "/metrics").text)
                assert total(served, "vllm:request_success_total") > 0  # it gets traffic again


def test_revoke_key_in_redis_mode_reaches_every_instance(redis_url, tmp_path):
    """`revoke-key` also revokes in Redis: an instance whose own keys file still has the key
    refuses it from its next request on."""
    from workbench.cli import main as workbench

    limits = redis_limits(redis_url)
    conf = tmp_path / "gateway.yaml"
    conf.write_text(yaml.safe_dump({"keys_file": str(tmp_path / "keys.yaml"), "limits": limits,
                                    "filter": {"enabled": False}, "audit": {"path": str(tmp_path / "a.sqlite")}}))
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump([{"id": "team-a", "sha256": hash_key(KEY)}]))

    async def revoked_for_another_instance() -> bool:
        other = RedisStore(GatewayConfig.model_validate({"limits": limits}).limits)
        try:
            return await other.is_revoked("team-a")
        finally:
            await other.aclose()

    assert not asyncio.run(revoked_for_another_instance())
    assert workbench(["gateway", "--config", str(conf), "revoke-key", "team-a"]) == 0
    assert asyncio.run(revoked_for_another_instance())
