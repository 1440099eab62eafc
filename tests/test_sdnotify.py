"""sd_notify against a real AF_UNIX datagram socket bound by the test (as systemd binds one)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from edge_agent.daemon import sdnotify
from edge_agent.daemon.sdnotify import Watchdog
from tests.helpers import NotifySocket, wait_until


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify.sock")
    sock = NotifySocket(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


def test_messages_arrive(notify_socket):
    assert sdnotify.ready(status="model loaded, first frame done")
    assert sdnotify.status("12.5 fps,  0 dropped\nignored newline")
    assert sdnotify.watchdog()
    assert sdnotify.reloading()
    assert sdnotify.stopping()
    msgs = notify_socket.sync()
    assert len(msgs) == 5, msgs
    assert msgs[0] == "READY=1\nSTATUS=model loaded, first frame done"
    assert msgs[1] == "STATUS=12.5 fps, 0 dropped ignored newline"
    assert msgs[2] == "WATCHDOG=1"
    reloading, usec = msgs[3].split("\n")
    assert reloading == "RELOADING=1"
    mono_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert 0 <= mono_us - int(usec.split("=")[1]) < 10_000_000
    assert msgs[4] == "STOPPING=1"


def test_abstract_socket(monkeypatch):
    name = f"edge-agent-test-{os.getpid()}"
    sock = NotifySocket("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready()
        assert sock.sync() == ["READY=1"]
    finally:
        sock.close()


def test_noop_without_socket_and_when_socket_is_gone(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False and sdnotify.watchdog() is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert sdnotify.status("x") is False  # logged at debug, never raised


def test_watchdog_interval_rules():
    pid = str(os.getpid())
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 15.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert sdnotify.watchdog_interval({}) is None


def test_watchdog_pings_only_while_progress_is_made(notify_socket, monkeypatch):
    """A worker thread 'processes frames' then hangs (fault injected): pings must stop."""
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # WatchdogSec=0.1 -> ping every 0.05 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    wd = Watchdog()
    assert wd.interval == pytest.approx(0.05) and wd.enabled
    hang = threading.Event()
    stop = threading.Event()

    def pipeline() -> None:
        while not stop.is_set():
            if hang.is_set():
                stop.wait()  # a stuck invoke(): no more progress
                return
            wd.progress()
            time.sleep(0.005)

    worker = threading.Thread(target=pipeline)
    with wd:
        worker.start()
        notify_socket.wait_count("WATCHDOG=1", 3)
        hang.set()
        # the first interval without progress withholds its ping; no progress can follow (the
        # worker is stuck), so from then on every interval must be a withheld ping
        missed = wait_until(lambda: wd.missed, what="a withheld ping")
        alive = notify_socket.sync()
        wait_until(lambda: wd.missed >= missed + 5, what="five more intervals")
        stuck = notify_socket.sync()[len(alive):]
        stop.set()
        worker.join()
    assert alive.count("WATCHDOG=1") >= 3
    assert set(alive) == {"WATCHDOG=1"}
    assert stuck == [], "no WATCHDOG=1 while the pipeline is stuck"
    assert wd.missed >= 6


def test_watchdog_startup_grace_then_requires_progress(notify_socket):
    wd = Watchdog(interval=1.0, startup_grace_s=5.0)
    assert wd.tick(now=101.0, started=100.0) is True  # in grace, no progress yet: ping
    assert wd.tick(now=106.0, started=100.0) is False  # grace over, no progress
    wd.progress()
    assert wd.tick(now=107.0, started=100.0) is True
    assert wd.tick(now=108.0, started=100.0) is False
    assert notify_socket.sync() == ["WATCHDOG=1", "WATCHDOG=1"]
    assert wd.pings == 2 and wd.missed == 2


def test_watchdog_disabled_without_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    def watchdog_threads() -> int:
        return sum(1 for t in threading.enumerate() if t.name == "sd-watchdog")

    before = watchdog_threads()
    wd = Watchdog().start()
    assert not wd.enabled and watchdog_threads() == before  # start() started nothing
    wd.progress()
    wd.stop()
    assert wd.pings == 0
