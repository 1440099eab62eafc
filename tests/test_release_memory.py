"""A dropped interpreter's heap goes back to the system (``system.release_memory``, called after
every remote benchmark and deployment): without it each model built on a new worker thread leaves
its glibc arena resident, and RSS creeps from one command to the next (the soak's first minutes)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edge_agent.daemon.system import release_memory, rss_mb
from edge_agent.inference.segmenter import Segmenter
from tests.data import DM05, DM10

pytestmark = pytest.mark.skipif(rss_mb() is None, reason="needs /proc/self/status")


def build_and_drop_on_a_worker_thread() -> None:
    def work() -> None:  # what a benchmark or a deployment's test run does
        Segmenter(str(DM10)).segment(np.zeros((480, 640, 3), np.uint8))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()


def test_rss_returns_to_the_baseline_after_each_dropped_model():
    running = Segmenter(str(DM05))  # the agent's own model stays loaded
    running.segment(np.zeros((480, 640, 3), np.uint8))
    release_memory()
    baseline = rss_mb()
    after = []
    for _ in range(4):
        build_and_drop_on_a_worker_thread()
        before_trim = rss_mb()
        assert release_memory() is True  # glibc here: the trim ran
        after.append(rss_mb())
        assert after[-1] <= before_trim
    # a dm1.0 interpreter holds ~20-40 MB; after each trim RSS is back near the baseline, no creep
    assert max(after) - baseline < 12, (baseline, after)
    assert after[-1] - after[0] < 4, after
