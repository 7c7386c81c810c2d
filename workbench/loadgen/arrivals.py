"""Arrival processes: offsets in seconds from the start of a step at which requests are sent.

A registry keyed by name (``ARRIVALS``); each takes the target rate (requests/s), the number of
arrivals or a duration, a seeded ``numpy.random.Generator`` and the burstiness. The gaps follow
vLLM's ``get_request``: Poisson = exponential gaps of mean 1/rate; bursty = gamma gaps with shape
``burstiness`` and scale 1/(rate * burstiness) (same mean, coefficient of variation
1/sqrt(burstiness)); constant = 1/rate. The first request goes at offset 0. An infinite rate sends
everything at offset 0.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

Gaps = Callable[[float, int, np.random.Generator, float], np.ndarray]


def _poisson(rate: float, n: int, rng: np.random.Generator, burstiness: float) -> np.ndarray:
    return rng.exponential(1.0 / rate, size=n)


def _constant(rate: float, n: int, rng: np.random.Generator, burstiness: float) -> np.ndarray:
    return np.full(n, 1.0 / rate)


def _bursty(rate: float, n: int, rng: np.random.Generator, burstiness: float) -> np.ndarray:
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


ARRIVALS: dict[str, Gaps] = {"poisson": _poisson, "constant": _constant, "bursty": _bursty}


def schedule(kind: str, rate: float, rng: np.random.Generator, n: int | None = None,
             duration_s: float | None = None, burstiness: float = 1.0) -> np.ndarray:
    """Send offsets (s, ascending, first 0) for ``n`` arrivals, or for every arrival before
    ``duration_s``. With a duration the count is random for poisson/bursty, as it should be."""
    if kind not in ARRIVALS:
        raise ValueError(f"unknown arrival process {kind!r}; known: {', '.join(ARRIVALS)}")
    if (n is None) == (duration_s is None):
        raise ValueError("give exactly one of n and duration_s")
    gaps = ARRIVALS[kind]
    if math.isinf(rate):
        if n is None:
            raise ValueError("an infinite rate needs a request count, not a duration")
        return np.zeros(n)
    if n is not None:
        return np.concatenate([[0.0], np.cumsum(gaps(rate, n - 1, rng, burstiness))]) if n else np.zeros(0)
    out: list[float] = [0.0]
    while True:  # draw in blocks until past the duration
        block = out[-1] + np.cumsum(gaps(rate, max(16, int(rate * duration_s)), rng, burstiness))
        out.extend(block[block < duration_s].tolist())
        if block[-1] >= duration_s:
            return np.asarray(out)
