#!/usr/bin/env python3
"""edge-agent soak benchmark: the real daemon at full speed for a long time, RSS slope per publish mode.

    .venv/bin/python bench/soak.py [--minutes 20 | --frames 100000] [--modes frame,interval]

For each publish mode (``publish.timings = "frame"`` and ``"interval"``) one run of the real agent
(``python -m edge_agent run``) on the synthetic 640x480 source (``--size``) at full speed (``source.fps = 0``),
masks, results and overlays published to a real mosquitto and drained by a subscriber, with a
remote benchmark and a remote deployment (alternating between the dm1.0 and dm0.5 Coral models)
every ``--command-every`` seconds through the fleet client. The agent's RSS, threads and open
fds are sampled every second; after the warm-up (``--warmup-s``, default one full command cycle,
at least 60 s and a fifth of the run) the least-squares slope of RSS at the same program state
is printed in MB/h next to the target (< 5 MB/h): every ``--pause-every`` seconds the commands
pause for ``--pause-s`` after a full cycle (the configured dm0.5 runs again), and the median RSS
of each pause's second half is one level. Without commands (or fewer than 3 pauses), the slope
of the lowest RSS of each minute (``--window-s``). The minima slope and the slope over all
samples are printed too.

The slope per 1000 frames is printed too: it does not depend on this machine's frame rate (the
issue's leak was ~400 kB per 1000 frames). A leak shows as a slope that does not depend on the
run length; the high-water mark reached during warm-up (allocator arenas, the interpreter, a
second model during a deployment) does not.
Exit status 1 when a mode misses the target, a command got no final answer, or the agent died.
Results and the reading of them: docs/performance.md ("Soak").
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

# run as a script, bench/ is on sys.path; importing perf also puts the repository there
from perf import LABELS, MODEL_FILES, REPO

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from edge_agent.comms.broker import MosquittoBroker  # noqa: E402
from edge_agent.config import MqttConfig  # noqa: E402
from edge_agent.fleet.bench import command_params  # noqa: E402
from edge_agent.fleet.client import FleetClient  # noqa: E402
from edge_agent.fleet.deploy import deploy, deploy_params  # noqa: E402

DM05, DM10 = MODEL_FILES["dm0.5"], MODEL_FILES["dm1.0"]
DEVICE = "soak"
PREFIX = "edge-agent"
TARGET_MB_H = 5.0


def toml_value(value: Any) -> str:
    return json.dumps(value)


def write_config(path: Path, port: int, mode: str, threads: int, size: str = "640x480") -> Path:
    width, height = (int(v) for v in size.lower().split("x"))
    sections = {
        "agent": {"device_id": DEVICE, "log_level": "info", "state_dir": str(path.parent / "state")},
        "source": {"kind": "synthetic", "width": width, "height": height, "fps": 0},
        "model": {"path": str(DM05), "labels": str(LABELS), "threads": threads},
        "mqtt": {"host": "127.0.0.1", "port": port, "reconnect_min_s": 0.1, "reconnect_max_s": 1.0},
        "publish": {"timings": mode, "timings_interval_s": 5.0, "stats_interval_s": 2.0,
                    "overlay": True, "overlay_max_hz": 5.0},
    }
    path.write_text("\n".join(f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())
                              for name, values in sections.items()))
    return path


class Drain:
    """Subscribes to everything the device publishes (so the broker never queues for us) and keeps
    the newest ``stats`` document and message counts per topic kind."""

    def __init__(self, port: int) -> None:
        self.counts: Dict[str, int] = {}
        self.stats: Optional[Dict[str, Any]] = None
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{PREFIX}/{DEVICE}/#", qos=0)
        self.client.on_subscribe = lambda *a: self._ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        if not self._ready.wait(10):
            raise RuntimeError("the drain subscriber could not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        kind = msg.topic[len(PREFIX) + len(DEVICE) + 2:].split("/", 1)[0]
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            if kind == "stats":
                self.stats = json.loads(msg.payload)

    def processed(self) -> int:
        with self._lock:
            return int(self.stats["frames"]["processed"]) if self.stats else 0

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def proc_sample(pid: int) -> Optional[Tuple[float, int, int]]:
    """(RSS MB, threads, open fds) of a process from /proc; None once it is gone."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return None
    return int(fields["VmRSS"].split()[0]) / 1024.0, int(fields["Threads"]), fds


def after_warmup(samples: List[Tuple[float, float, int, int, int]], warmup: float) -> List[Tuple[float, float]]:
    return [(t, r) for t, r, *_ in samples if t >= warmup]


def window_minima(points: List[Tuple[float, float]], window_s: float) -> List[Tuple[float, float]]:
    """The lowest RSS of each ``window_s`` window (at the window's middle): a remote benchmark's
    second interpreter or a deployment's second model raise RSS for seconds and give it back,
    which says nothing about a leak but swings a least-squares line over a short run."""
    out: Dict[int, float] = {}
    for t, r in points:
        k = int(t // window_s)
        out[k] = min(r, out.get(k, r))
    return [((k + 0.5) * window_s, r) for k, r in sorted(out.items())]


def per_frame(samples: List[Tuple[float, float, int, int, int]], warmup: float) -> List[Tuple[float, float]]:
    """(frames, MB) after the warm-up: growth per frame, whatever the frame rate of this machine."""
    return [(f, r) for t, r, _, _, f in samples if t >= warmup]


def quiet_levels(points: List[Tuple[float, float]], pauses: List[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """The median RSS over the second half of each command pause: the same program state every
    time (the configured dm0.5 runs, no command in flight, the last deployment's heap trimmed).
    Between pauses RSS depends on which model runs and on the command in flight (here 145 to
    200 MB), so per-window minima scatter by ~15 MB and a 20-minute line through them by
    +-15 MB/h; these levels do not."""
    out = []
    for a, b in pauses:
        vals = sorted(r for t, r in points if (a + b) / 2 <= t <= b)
        if vals:
            out.append(((a + b) / 2, vals[len(vals) // 2]))
    return out


def slope(points: List[Tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points."""
    n = len(points)
    if n < 2:
        return float("nan")
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else float("nan")


class Commands:
    """Alternates a remote benchmark and a remote deployment (dm1.0 <-> dm0.5) in a thread."""

    def __init__(self, port: int, every_s: float, quiet_every_s: float = 0.0, quiet_s: float = 60.0) -> None:
        self.every_s = every_s
        self.quiet_every_s = quiet_every_s  # 0: commands without a pause
        self.quiet_s = quiet_s
        self.quiet: List[Tuple[float, float]] = []  # (start, end) monotonic of each pause
        self.client = FleetClient(MqttConfig(host="127.0.0.1", port=port)).connect()
        self.models = [(DM10, DM10.read_bytes()), (DM05, DM05.read_bytes())]
        self.results: List[Tuple[str, str]] = []  # (command, final status or problem)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-commands", daemon=True)

    def start(self) -> "Commands":
        self._thread.start()
        return self

    def _run(self) -> None:
        turn = 0
        active_since = time.monotonic()
        while not self._stop.wait(self.every_s):
            # a pause at the end of a full cycle (the configured dm0.5 runs again, heap trimmed):
            # the same program state each time, RSS measured without a command in flight
            if (self.quiet_every_s and turn % 4 == 0 and turn
                    and time.monotonic() - active_since >= self.quiet_every_s):
                t0 = time.monotonic()
                if self._stop.wait(self.quiet_s):
                    break
                self.quiet.append((t0, time.monotonic()))
                active_since = time.monotonic()
            if turn % 2 == 0:
                params = command_params(runs=10, warmup=1, pipeline=True, input="random", samples=False)
                answers = self.client.request("benchmark", params, devices=[DEVICE], timeout=120)
                what = "benchmark"
            else:
                path, data = self.models[(turn // 2) % 2]
                params = deploy_params(data, path.stem, labels=None, confirm_frames=5)
                answers = deploy(self.client, params, data, devices=[DEVICE], timeout=180)
                what = f"deploy {path.stem}"
            answer = answers.get(DEVICE)
            status = getattr(answer, "status", None) or "no answer"
            self.results.append((what, str(status)))
            turn += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(200)
        self.client.close()


def run_mode(mode: str, args: argparse.Namespace, broker: MosquittoBroker, workdir: Path) -> Dict[str, Any]:
    mode_dir = workdir / mode
    mode_dir.mkdir()
    config = write_config(mode_dir / "agent.toml", broker.port, mode, args.threads, args.size)
    log_path = mode_dir / "agent.log"
    drain = Drain(broker.port)
    with open(log_path, "wb") as log_file:
        agent = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                                 stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO)
    samples: List[Tuple[float, float, int, int, int]] = []  # (t, rss, threads, fds, frames)
    commands: Optional[Commands] = None
    try:
        deadline = time.monotonic() + 120
        while drain.processed() == 0:
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{mode}: the agent produced no stats; see {log_path}")
            time.sleep(0.2)
        if args.command_every > 0:
            commands = Commands(broker.port, args.command_every, args.pause_every, args.pause_s).start()
        start = time.monotonic()
        end = start + args.minutes * 60 if args.minutes else float("inf")
        next_print = start + 30
        while time.monotonic() < end and (not args.frames or drain.processed() < args.frames):
            sample = proc_sample(agent.pid)
            if sample is None or agent.poll() is not None:
                raise RuntimeError(f"{mode}: the agent died; see {log_path}")
            now = time.monotonic()
            samples.append((now - start, sample[0], sample[1], sample[2], drain.processed()))
            if now >= next_print:
                next_print += 30
                print(f"  {mode}: {now - start:5.0f} s  {samples[-1][4]:7d} frames  RSS {sample[0]:6.1f} MB  "
                      f"threads {sample[1]}  fds {sample[2]}", flush=True)
            time.sleep(1.0)
    finally:
        if commands is not None:
            commands.close()
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
        try:
            code = agent.wait(30)
        except subprocess.TimeoutExpired:
            agent.kill()
            code = agent.wait()
        drain.close()
    duration = samples[-1][0]
    # Warm-up: one full command cycle (benchmark, deploy dm1.0, benchmark, deploy dm0.5) reaches
    # the high-water mark of both models; a leak is growth beyond it.
    warmup = args.warmup_s if args.warmup_s is not None else max(60.0, 5 * args.command_every, duration / 5)
    if not after_warmup(samples, warmup):
        raise RuntimeError(f"{mode}: the run ended before the warm-up ({warmup:.0f} s) did")
    after = after_warmup(samples, warmup)
    frames = samples[-1][4] - samples[0][4]
    pauses = [(a - start, b - start) for a, b in (commands.quiet if commands else [])]
    levels = quiet_levels(after, pauses)
    minima_slope = 3600.0 * slope(window_minima(after, args.window_s))
    level_slope = 3600.0 * slope(levels) if len(levels) >= 3 else None
    return {
        "mode": mode, "duration_s": round(duration, 1), "warmup_s": warmup, "frames": frames,
        "fps": round(frames / duration, 1) if duration else None,
        "rss_start_mb": round(samples[0][1], 1), "rss_after_warmup_mb": round(after[0][1], 1) if after else None,
        "rss_end_mb": round(samples[-1][1], 1), "rss_max_mb": round(max(s[1] for s in samples), 1),
        # the verdict: the levels of the command pauses when there are 3+, else the window minima
        "slope_mb_h": round(level_slope if level_slope is not None else minima_slope, 2),
        "slope_basis": (f"{len(levels)} pause levels" if level_slope is not None
                        else f"{args.window_s:.0f}-s minima"),
        "slope_minima_mb_h": round(minima_slope, 2),
        "pause_levels": [(round(t, 1), round(r, 2)) for t, r in levels],
        "slope_all_samples_mb_h": round(3600.0 * slope(after), 2),
        "kb_per_1000_frames": round(1e6 * slope(per_frame(samples, warmup)), 1),
        "threads": (samples[0][2], samples[-1][2]), "fds": (samples[0][3], samples[-1][3]),
        "commands": commands.results if commands else [], "messages": dict(drain.counts),
        "exit_code": code, "log": str(log_path),
        "samples": [{"t": round(t, 1), "rss_mb": round(r, 2), "threads": th, "fds": fd, "frames": f}
                    for t, r, th, fd, f in samples],
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="per mode (0: until --frames)")
    parser.add_argument("--frames", type=int, default=0, help="stop a mode after this many frames (0: no limit)")
    parser.add_argument("--modes", default="frame,interval", help="publish.timings modes to soak")
    parser.add_argument("--warmup-s", type=float, default=None,
                        help="ignored for the slope (default: max(60 s, 5 command periods, 1/5 of the run))")
    parser.add_argument("--command-every", type=float, default=15.0,
                        help="seconds between remote commands (0: none, to isolate the per-frame path)")
    parser.add_argument("--pause-every", type=float, default=240.0,
                        help="pause the commands after a full cycle every this many seconds (0: never)")
    parser.add_argument("--pause-s", type=float, default=60.0, help="length of each pause")
    parser.add_argument("--window-s", type=float, default=60.0,
                        help="the slope is fitted to the lowest RSS of each window of this length")
    parser.add_argument("--threads", type=int, default=1, help="model.threads of the agent")
    parser.add_argument("--size", default="640x480", help="the synthetic source's frame size, WxH")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not args.minutes and not args.frames:
        parser.error("give --minutes or --frames")
    results = []
    with tempfile.TemporaryDirectory(prefix="edge-agent-soak-") as tmp, \
            MosquittoBroker(workdir=tmp) as broker:
        for mode in args.modes.split(","):
            print(f"soak {mode}: {args.minutes or '-'} min / {args.frames or '-'} frames, {args.size} frames", flush=True)
            result = run_mode(mode, args, broker, Path(tmp))
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k not in ("commands", "log", "samples")}),
                  flush=True)
    ok = True
    print(f"\n{'mode':10} {'min':>5} {'frames':>8} {'fps':>6} {'RSS MB start/warm/end/max':>27} "
          f"{'slope MB/h':>10} {'(minima)':>8} {'(all)':>7} {'kB/1000 fr':>10}  commands (final answers)")
    for r in results:
        finals = sum(1 for _, s in r["commands"] if s in ("done", "rejected", "failed"))
        good = r["slope_mb_h"] < TARGET_MB_H and finals == len(r["commands"]) and r["exit_code"] == 0
        ok = ok and good
        rss = f"{r['rss_start_mb']}/{r['rss_after_warmup_mb']}/{r['rss_end_mb']}/{r['rss_max_mb']}"
        print(f"{r['mode']:10} {r['duration_s'] / 60:5.1f} {r['frames']:8d} {r['fps']:6} {rss:>27} "
              f"{r['slope_mb_h']:10.2f} {r['slope_minima_mb_h']:8.1f} {r['slope_all_samples_mb_h']:7.1f} "
              f"{r['kb_per_1000_frames']:10.1f}  "
              f"{finals}/{len(r['commands'])}  "
              f"{'ok' if good else 'FAIL'} (target < {TARGET_MB_H} MB/h; slope: {r['slope_basis']})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
