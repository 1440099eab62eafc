"""Latency statistics: per-stage windows for the timings topic and the benchmarks."""

from __future__ import annotations

import math
import random
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
    """Per-stage milliseconds over an interval; ``flush()`` returns the summary.

    Bounded by construction, however long nobody flushes (``publish.timings = "frame"`` runs
    for months between two summaries): count, mean and max are exact, the percentiles come from
    a uniform reservoir of at most ``max_samples`` values per stage (exact until it fills), and
    at most ``max_stages`` stage names are kept (the vocabulary has 8).
    """

    def __init__(self, max_samples: int = 2048, max_stages: int = 16, seed: int = 0) -> None:
        self.max_samples = max_samples
        self.max_stages = max_stages
        self._random = random.Random(seed)
        self._reset()

    def _reset(self) -> None:
        self._stages: Dict[str, _StageStats] = {}
        self.frames = 0

    def add(self, timings: Dict[str, float]) -> None:
        self.frames += 1
        for stage, ms in timings.items():
            stats = self._stages.get(stage)
            if stats is None:
                if len(self._stages) >= self.max_stages:
                    continue
                stats = self._stages[stage] = _StageStats(self.max_samples)
            stats.add(float(ms), self._random)

    def sizes(self) -> Dict[str, int]:
        """Values held per stage (what the bound is about)."""
        return {stage: len(s.sample) for stage, s in self._stages.items()}

    def flush(self) -> Dict[str, Dict[str, float]]:
        out = {}
        for stage, s in self._stages.items():
            data = sorted(s.sample)
            out[stage] = {"mean": round(s.total / s.count, 3), "p50": round(percentile(data, 50), 3),
                          "p90": round(percentile(data, 90), 3), "max": round(s.max, 3)}
        self._reset()
        return out


class _StageStats:
    """Exact count/sum/max and a reservoir sample (Vitter's algorithm R) of one stage."""

    __slots__ = ("capacity", "count", "total", "max", "sample")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.count = 0
        self.total = 0.0
        self.max = float("-inf")
        self.sample: List[float] = []

    def add(self, ms: float, rng: random.Random) -> None:
        self.count += 1
        self.total += ms
        if ms > self.max:
            self.max = ms
        if len(self.sample) < self.capacity:
            self.sample.append(ms)
        else:
            slot = rng.randrange(self.count)
            if slot < self.capacity:
                self.sample[slot] = ms
