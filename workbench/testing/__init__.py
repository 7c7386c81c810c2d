"""Test doubles shipped with the package, for the tests and the benchmarks, never for the pipeline:
``workbench.testing.fakeserver`` is a fake OpenAI-compatible server with a chosen TTFT, inter-token
delay and reply length (no model behind it). They live in the package, not under tests/, because
the benchmarks and ``python -m workbench.testing.fakeserver`` use them too.
"""
