"""The one rate limiter (output/throttle.py), on a hand-driven clock."""

from __future__ import annotations

from edge_agent.output.throttle import RateGate, Throttle


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_throttle_first_passes_then_one_per_interval_and_force_always():
    clock = Clock()
    t = Throttle(1.0, clock)
    assert t.remaining() == 0.0 and t.ready()
    clock.now += 0.4
    assert not t.ready() and abs(t.remaining() - 0.6) < 1e-9
    assert t.ready(force=True)  # a final answer is never swallowed, and restarts the interval
    clock.now += 0.9
    assert not t.ready()
    clock.now += 0.1
    assert t.ready()
    assert Throttle(0.0, clock).ready() and Throttle(-1, clock).interval == 0.0


def test_rate_gate_every_nth_and_at_most_max_hz():
    clock = Clock()
    gate = RateGate(every_n=3, max_hz=2.0, clock=clock)
    passed = []
    for _ in range(9):  # events 1, 4, 7 are candidates; 0.1 s apart, so the 2 Hz cap keeps 1 and 7
        passed.append(gate.allow())
        clock.now += 0.1
    assert passed == [True, False, False, False, False, False, True, False, False]
    unlimited = RateGate(1, 0.0, clock)
    assert all(unlimited.allow() for _ in range(5))
