"""Small helpers shared by the benchmarks: timing and result tables."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def best_of(
    fn: Callable[[], object], repeat: int = 3, seconds: float = 0.0
) -> tuple[float, object]:
    """Minimum wall time over ``repeat`` runs, and the last result.  With ``seconds``,
    more runs (up to 25) while the runs so far took less than that in all: a time of
    milliseconds needs many runs to be more than the machine's noise."""
    best, out, total, n = float("inf"), None, 0.0, 0
    while n < repeat or (total < seconds and n < 25):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        best, total, n = min(best, dt), total + dt, n + 1
    return best, out


def interleaved_best(
    fns: list[Callable[[], object]], repeat: int = 3, seconds: float = 0.0
) -> list[tuple[float, object]]:
    """:func:`best_of` for several functions run in turn, one round of each at a time:
    a ratio of their times then compares runs made under the same load, where separate
    series of runs can each fall in a faster or slower spell of a shared machine."""
    best = [float("inf")] * len(fns)
    out: list[object] = [None] * len(fns)
    total, n = 0.0, 0
    while n < repeat or (total < seconds and n < 25):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            out[i] = fn()
            dt = time.perf_counter() - t0
            best[i], total = min(best[i], dt), total + dt
        n += 1
    return list(zip(best, out, strict=True))


def random_spd(rng: np.random.Generator, p: int, rank: int = 400, jitter: float = 0.1):
    """A dense SPD matrix (low-rank plus diagonal), cheap to make for large p."""
    A = rng.normal(size=(p, rank)) / np.sqrt(rank)
    S = A @ A.T
    S[np.diag_indices(p)] += jitter
    return S


def report(name: str, rows: list[dict], quick: bool) -> None:
    """Print ``rows`` as a table and, for full runs, save them under ``bench/results``."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print(" | ".join(keys))
    for r in rows:
        cells = (r.get(k, "") for k in keys)
        print(" | ".join(f"{c:.4g}" if isinstance(c, float) else str(c) for c in cells))
    if not quick:
        RESULTS.mkdir(exist_ok=True)
        meta = {"machine": platform.machine(), "python": platform.python_version()}
        (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
