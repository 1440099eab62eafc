"""Latency statistics: per-stage windows for the timings topic and the benchmarks."""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Sequence


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of already sorted values."""
    if not sorted_values:
        return float("nan")
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def summarize(values: Iterable[float]) -> Dict[str, float]:
    """count/min/max/mean/std/p50/p90/p99 like TFLite's benchmark_model (std: population)."""
    data = sorted(float(v) for v in values)
    n = len(data)
    if n == 0:
        return {"count": 0}
    mean = sum(data) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in data) / n)
    return {
        "count": n,
        "min": data[0],
        "max": data[-1],
        "mean": mean,
        "std": std,
        "p50": percentile(data, 50),
        "p90": percentile(data, 90),
        "p99": percentile(data, 99),
    }


class StageWindow:
    """Collects per-stage milliseconds over an interval; ``flush()`` returns the summary."""

    def __init__(self) -> None:
        self._values: Dict[str, List[float]] = {}
        self.frames = 0

    def add(self, timings: Dict[str, float]) -> None:
        self.frames += 1
        for stage, ms in timings.items():
            self._values.setdefault(stage, []).append(ms)

    def flush(self) -> Dict[str, Dict[str, float]]:
        out = {}
        for stage, values in self._values.items():
            s = summarize(values)
            out[stage] = {k: round(s[k], 3) for k in ("mean", "p50", "p90", "max")}
        self._values = {}
        self.frames = 0
        return out
