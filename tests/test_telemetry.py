"""Telemetry's per-frame structures stay bounded whatever the publish mode (issue 14 item 10).

``publish.timings = "frame"`` never publishes an interval summary while running, so anything the
per-frame path adds to must be bounded by construction: these tests prove it by size and by the
Python heap (tracemalloc), and check that the bounded window still summarises correctly.
"""

from __future__ import annotations

import json
import random
import tracemalloc

import pytest

from edge_agent.output.stages import PIPELINE_STAGES
from edge_agent.daemon.telemetry import Telemetry
from edge_agent.output.timing import StageWindow, percentile


class CountingSink:
    """Counts what is published and keeps only the last payload per topic (bounded itself)."""

    def __init__(self) -> None:
        self.count = 0
        self.last = {}

    def publish(self, suffix, payload, qos=None, retain=False) -> bool:
        self.count += 1
        self.last[suffix] = payload
        return True


def frame_timings(rng: random.Random) -> dict:
    return {stage: rng.uniform(0.5, 40.0) for stage in PIPELINE_STAGES}


def feed(telemetry: Telemetry, start: int, n: int, rng: random.Random) -> None:
    for seq in range(start, start + n):
        telemetry.inferred()
        telemetry.frame_done(seq, frame_timings(rng))


@pytest.mark.parametrize("mode", ["frame", "interval"])
def test_per_frame_memory_is_bounded_in_every_timings_mode(mode):
    """30,000 frames without a single interval flush: the heap does not grow after warm-up.

    Before the fix every frame added 8 floats to lists nobody emptied in "frame" mode
    (+6.6 MB of heap over these 25,000 frames)."""
    sink = CountingSink()
    telemetry = Telemetry(sink, timings=mode, timings_interval_s=1e9, stats_interval_s=1e9)
    rng = random.Random(1)
    window = telemetry._window
    feed(telemetry, 0, 5_000, rng)  # warm-up: the reservoirs fill (2048 values per stage)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        feed(telemetry, 5_000, 25_000, rng)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert window.frames == 30_000
    assert window.sizes() == {stage: window.max_samples for stage in PIPELINE_STAGES}
    assert grown < 64 * 1024, f"{grown} bytes more after 25,000 frames"
    if mode == "frame":
        assert sink.count == 30_000 and json.loads(sink.last["timings"])["seq"] == 29_999


def test_stage_names_are_bounded_too():
    window = StageWindow(max_samples=4, max_stages=3)
    for i in range(100):
        window.add({f"stage{i}": 1.0, "stage0": 2.0})
    assert len(window.sizes()) == 3 and max(window.sizes().values()) <= 4


def test_bounded_window_summary_is_exact_until_full_and_close_after():
    small = [float(v) for v in range(1, 101)]
    window = StageWindow(max_samples=2048)
    for v in small:
        window.add({"inference": v})
    s = sorted(small)
    assert window.flush() == {"inference": {"mean": 50.5, "p50": round(percentile(s, 50), 3),
                                            "p90": round(percentile(s, 90), 3), "max": 100.0}}
    assert window.frames == 0 and window.sizes() == {}
    # 100,000 values uniform in 0..1000: mean and max exact, percentiles from the reservoir
    rng = random.Random(7)
    values = [rng.uniform(0, 1000) for _ in range(100_000)]
    for v in values:
        window.add({"inference": v})
    out = window.flush()["inference"]
    assert out["mean"] == pytest.approx(sum(values) / len(values), abs=1e-3)
    assert out["max"] == round(max(values), 3)
    assert out["p50"] == pytest.approx(500, abs=40) and out["p90"] == pytest.approx(900, abs=25)


def test_interval_mode_still_publishes_its_summary():
    sink = CountingSink()
    telemetry = Telemetry(sink, timings="interval", timings_interval_s=5.0, stats_interval_s=1e9)
    feed(telemetry, 0, 10, random.Random(3))
    telemetry.tick(now=telemetry._next_timings + 0.01)
    doc = json.loads(sink.last["timings"])
    assert doc["frames"] == 10 and tuple(doc["stages"]) == PIPELINE_STAGES
    assert telemetry._window.frames == 0
