"""Fuzz the gateway with Schemathesis from its own OpenAPI document (fake upstream behind it):
no generated request, valid or not, may get a 5xx or break the server: >= 1,000 cases, and a
quick ~160-case variant for a fast edit-test loop (`-k quick`).

    python -m pytest tests/test_gateway_fuzz.py
"""

from __future__ import annotations


import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from gateway_helpers import AUTH, make_cfg
from workbench.gateway.server import GatewayServer
from workbench.testing.fakeserver import FakeServer


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    with FakeServer(output_tokens=4) as fake, GatewayServer(make_cfg(tmp, {"fake-model": fake.base_url})) as g:
        yield g


def fuzz(gw, mode: str, n: int) -> dict[int, int]:
    doc = httpx.get(gw.root_url + "/openapi.json", headers=AUTH).json()
    schema = schemathesis.openapi.from_dict(doc)
    session = requests.Session()
    statuses: dict[int, int] = {}

    @given(case=schema.as_strategy(schemathesis.GenerationMode(mode)))
    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def one(case):
        r = case.call(base_url=gw.root_url, session=session, headers=AUTH, timeout=30)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (case.operation.label, case.body, r.status_code, r.text[:300])
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    one()
    assert httpx.get(gw.root_url + "/health").status_code == 200  # still serving
    print(mode, "cases by status:", dict(sorted(statuses.items())))
    return statuses


def test_fuzz_quick_finds_no_5xx(gw):
    positive, negative = fuzz(gw, "positive", 80), fuzz(gw, "negative", 80)
    assert positive.get(200, 0) >= 20  # valid requests got through to the upstream
    assert sum(negative.values()) - negative.get(200, 0) >= 20  # and invalid ones were refused


def test_fuzz_1000_cases_find_no_5xx(gw):  # ~25 s on 2 cores: part of every run
    statuses = [fuzz(gw, "positive", 600), fuzz(gw, "negative", 600)]
    assert sum(sum(s.values()) for s in statuses) >= 1000
