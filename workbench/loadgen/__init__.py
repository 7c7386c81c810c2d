"""The load generator: an open-loop, pure-HTTP client for OpenAI-compatible servers.

No vLLM, torch or lm-eval here (DESIGN.md): it starts in milliseconds and runs on any machine.

    arrivals   when requests are sent (poisson / constant / bursty), a registry
    workloads  what is sent (ShareGPT, JSONL, synthetic), a registry
    client     the open-loop step runner and one request function per endpoint
    metrics    pure functions from raw records to vLLM-defined metrics
    probes     server /metrics scrapes and utilization sampling during a step
    summary    typed step / rate summaries with their intervals (what the report reads)
    timestats  intervals over time-ordered requests (blocks of consecutive requests)
    timecompare  arms and a drift control compared per block (repeat), not per request

The load test's plan, arms and executor are workbench/loadtest/; from the shell, on the stage's
config (params.yaml's ``loadtest`` section with ``--set`` over it)::

    python -m workbench.loadgen --set base_url=http://127.0.0.1:8000/v1 --set model=m --set 'rates=[10]'
"""
