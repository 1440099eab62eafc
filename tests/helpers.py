"""Helpers shared by the test modules: waiting on conditions, agent processes, a notify socket.

The one home of what more than one test module needs (test modules never import each other).
Test data paths live in ``tests/data.py``, the real mosquitto harness in ``tests/broker.py``.
Every wait here is on a condition with a deadline; none is a fixed sleep.
"""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, TypeVar

from tests.data import DM05, LABELS, REPO

T = TypeVar("T")

# The fields of a benchmark result (cmd/benchmark, ``edge-agent bench --json``), written out here
# rather than taken from the code so that a field added or dropped there fails the tests.
RESULT_KEYS = {
    "schema", "agent_version", "device_id", "started_at", "model", "runtime", "runtime_version",
    "delegate", "threads", "settings", "init_ms", "first_inference_ms", "warmup_avg_ms", "invoke",
    "stages", "fps", "stopped", "duration_s", "peak_rss_mb", "rss_mb", "device", "live_pipeline",
    "samples_ms",
}


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition",
               poll_s: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something truthy (returned); AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll_s)


@contextmanager
def connected_comms(port: int, device: str, **mqtt: Any) -> Iterator[Any]:
    """A real ``MqttComms`` for ``device`` connected to the loopback broker on ``port``; stopped after."""
    from edge_agent.comms.mqtt import MqttComms
    from edge_agent.config import MqttConfig

    comms = MqttComms(MqttConfig(host="127.0.0.1", port=port, **mqtt), device)
    comms.start()
    try:
        assert comms.wait_connected(10), f"{device}: not connected to 127.0.0.1:{port}"
        yield comms
    finally:
        comms.stop()


# -- the agent as a real process --------------------------------------------------------------------

def write_config(path: Path, device: str, port: int, source: dict, **sections) -> Path:
    """An agent TOML: ``source`` and any ``[section]`` given as dicts; dm05 and the loopback broker."""
    lines = [f'[agent]\ndevice_id = "{device}"\nlog_level = "debug"\nstate_dir = "{path.parent / "state"}"']
    lines.append("[source]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in source.items()))
    model = {"path": str(DM05), "labels": str(LABELS)}
    model.update(sections.pop("model", {}))
    lines.append("[model]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in model.items()))
    mqtt = {"host": "127.0.0.1", "port": port, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5}
    mqtt.update(sections.pop("mqtt", {}))
    lines.append("[mqtt]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in mqtt.items()))
    for name, values in sections.items():
        lines.append(f"[{name}]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items()))
    path.write_text("\n\n".join(lines) + "\n")
    return path


def start_agent(config: Path, env=None, mounts: Sequence[str] = ()) -> subprocess.Popen:
    """``python -m edge_agent run --config CONFIG``, stdout and stderr captured together.

    ``mounts``: shell commands (``mount --bind -o ro D D``, ``mount -t tmpfs -o size=1m tmpfs D``)
    run first in a private mount namespace of the agent alone (``unshare -m``; the process id
    stays the agent's, so ``/proc/<pid>/root/...`` shows its view). See :func:`can_unshare_mounts`.
    """
    cmd = [sys.executable, "-m", "edge_agent", "run", "--config", str(config)]
    if mounts:
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-ec",
               "; ".join([*mounts, 'exec "$@"']), "sh", *cmd]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def can_unshare_mounts() -> bool:
    """True if this process may make private mount namespaces and mount in them (root, CAP_SYS_ADMIN)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


def write_clip(path: Path, frames: int, colors: Sequence[Tuple[int, int, int]], size=(96, 64)) -> Path:
    """An MJPG .avi of ``frames`` solid frames cycling through the RGB ``colors`` (real OpenCV encoding)."""
    import cv2
    import numpy as np

    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (w, h))
    assert writer.isOpened(), "OpenCV cannot write MJPG/avi here"
    for i in range(frames):
        r, g, b = colors[i % len(colors)]
        writer.write(np.full((h, w, 3), (b, g, r), np.uint8))  # VideoWriter takes BGR
    writer.release()
    return path


def stop_agent(proc: subprocess.Popen, sig=signal.SIGTERM) -> str:
    """Signal the agent (if still running), wait up to 20 s (then SIGKILL); its output (if piped)."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return (out or b"").decode(errors="replace")  # b"" when stdout went to a file


def stop_agent_when_done(proc: subprocess.Popen, timeout: float = 60) -> str:
    """Wait for an agent that ends by itself (a finite source); stopped after ``timeout``."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        return stop_agent(proc)
    return (out or b"").decode(errors="replace")


# -- the console and a real headless browser --------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


class ConsoleProcess:
    """``python -m edge_agent console`` on a free loopback port; its output drained in a thread."""

    def __init__(self, broker_port: int, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "console", "--host", "127.0.0.1", "--port", str(broker_port),
             "--listen", "127.0.0.1:0", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        first = self.proc.stdout.readline()  # the URL line, or the one-line refusal
        self.lines: List[str] = [first]
        if not first.startswith("edge-agent console: "):
            raise AssertionError(f"the console did not start: {first}{self.stop()}")
        self.url = first.split()[2]
        self.pid = self.proc.pid
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return "".join(self.lines)


def chromium_available() -> bool:
    return Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


def chromium(profile: Path, width: int = 1500, height: int = 1100):
    """Debian's chromium, headless, through Debian's chromedriver (Selenium); a fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


# -- systemd's notify socket ------------------------------------------------------------------------

_BARRIER = "X-TEST-BARRIER="


class NotifySocket:
    """A bound AF_UNIX datagram socket, as systemd binds for NOTIFY_SOCKET, recording what arrives.

    ``address`` is a path, or ``"\\0name"`` for an abstract socket. A thread receives; waits are
    on conditions with deadlines. ``sync()`` sends a marker datagram to the socket itself and waits
    for it: datagrams are delivered in order, so everything sent before it has then been recorded.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.2)
        self.messages: List[Tuple[float, str]] = []  # (time.monotonic() on arrival, datagram)
        self._barriers = itertools.count(1)
        self._barriers_seen: set = set()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-notify-socket", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096).decode()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._cond:
                if data.startswith(_BARRIER):
                    self._barriers_seen.add(int(data[len(_BARRIER):]))
                else:
                    self.messages.append((time.monotonic(), data))
                self._cond.notify_all()

    def _wait(self, ready: Callable[[], T], timeout: float, what: Callable[[], str]) -> T:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = ready()
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{what()} within {timeout} s; got {self.messages}")
                self._cond.wait(remaining)

    def texts(self, since: float = 0.0) -> List[str]:
        with self._cond:
            return [m for at, m in self.messages if at >= since]

    def clear(self) -> None:
        with self._cond:
            self.messages.clear()

    def sync(self, timeout: float = 5.0) -> List[str]:
        """Every datagram sent before this call, recorded (the texts, in order)."""
        n = next(self._barriers)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as out:
            out.sendto(f"{_BARRIER}{n}".encode(), self.address)
        self._wait(lambda: n in self._barriers_seen, timeout, lambda: f"marker {n} not received")
        return self.texts()

    def count(self, text: str, since: float = 0.0) -> int:
        with self._cond:
            return sum(1 for at, m in self.messages if at >= since and text in m.splitlines())

    def wait_for(self, text: str, timeout: float = 20.0) -> float:
        """Arrival time of the first datagram with the line ``text``."""
        def first() -> Optional[float]:
            return next((at for at, m in self.messages if text in m.splitlines()), None)
        return self._wait(first, timeout, lambda: f"{text} not received")

    def wait_count(self, text: str, count: int, since: float = 0.0, timeout: float = 20.0) -> int:
        """Block until ``count`` datagrams with the line ``text`` arrived at or after ``since``."""
        def enough() -> int:
            n = self.count(text, since)
            return n if n >= count else 0
        return self._wait(enough, timeout, lambda: f"fewer than {count}x {text} since {since:.3f}")

    def wait_silence(self, text: str, quiet_s: float, timeout: float = 20.0) -> float:
        """Block until ``text`` has not arrived for ``quiet_s`` s (counted from this call at the
        earliest); returns when that silence began. AssertionError if it keeps arriving."""
        start = time.monotonic()
        deadline = start + timeout
        with self._cond:
            while True:
                last = max([at for at, m in self.messages if text in m.splitlines()] + [start])
                now = time.monotonic()
                if now - last >= quiet_s:
                    return last
                if now >= deadline:
                    raise AssertionError(f"{text} kept arriving: no {quiet_s} s gap within {timeout} s")
                self._cond.wait(min(deadline, last + quiet_s) - now)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class OutputLines:
    """Reads a process's stdout line by line in a thread, so a test can wait on log lines while it runs."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: List[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="test-output-lines", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()

    def matching(self, text: str) -> List[str]:
        with self._cond:
            return [line for line in self.lines if text in line]

    def wait_for(self, text: str, count: int = 1, timeout: float = 30.0) -> List[str]:
        """The first ``count`` lines containing ``text``; AssertionError with the output at the deadline."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [line for line in self.lines if text in line]
                if len(found) >= count:
                    return found[:count]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._thread.is_alive()):
                    tail = "\n".join(self.lines[-40:])
                    raise AssertionError(f"fewer than {count} lines with {text!r} within {timeout} s:\n{tail}")
                self._cond.wait(min(remaining, 0.2))

    def stop(self, sig=signal.SIGTERM) -> str:
        """Stop the process (see stop_agent) and return all its output."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._thread.join(5)
        with self._cond:
            return "\n".join(self.lines)


class ListSink:
    """A pipeline sink that keeps every (suffix, payload) it is handed."""

    def __init__(self):
        self.messages = []

    def publish(self, suffix, payload, qos=None, retain=False):
        self.messages.append((suffix, bytes(payload)))
        return True


def build_wheel(work: Path) -> Path:
    """``pip wheel --no-deps`` of a copy of the checkout's files, as users build it (the build
    writes build/ and egg-info into its source tree: the copy keeps the checkout untouched)."""
    src, dist = work / "src", work / "dist"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True)
    for rel in filter(None, listed.stdout.decode().split("\0")):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(src)],
                          cwd=work, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = dist.glob("edge_agent-*.whl")
    shutil.rmtree(src)
    return wheel
