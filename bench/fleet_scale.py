#!/usr/bin/env python3
"""Fleet scale benchmark: 50 real agents on one mosquitto, driven by the real host CLI.

    .venv/bin/python bench/fleet_scale.py [--agents 50] [--fps 0.2] [--runs 5] [--out DIR]

Starts one mosquitto (``MosquittoBroker``) and ``--agents`` real agent processes
(``python -m edge_agent run``: the depth-0.5 Coral model, 1 interpreter thread, a synthetic
camera at a low frame rate, each its own state directory), then measures, one after the other:

* start-up     process start until every agent's retained ``online`` arrived;
* devices      ``edge-agent remote devices --json``: every agent listed (retained + presence);
* bench        ``edge-agent remote bench --all``: one fleet-wide request, a result from every agent;
* deploy       ``edge-agent remote deploy --all`` of the depth-1.0 model: every agent ``active``,
               and the chunks published ONCE on the fleet topic (counted by a subscriber);

each with its wall time, the host client's peak RSS (``wait4`` of the CLI process) and the
broker's peak RSS (mosquitto's VmHWM) so far; and the agents' total RSS at the end. Prints a
table and writes ``fleet_scale.json`` to ``--out``. Exit 1 when any agent is missed. A result:
docs/performance.md ("Fleet scale").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from bench.perf import LABELS, MODEL_FILES  # noqa: E402  (the test data paths; perf imports stdlib only)
from edge_agent.comms.broker import MosquittoBroker  # noqa: E402

DM05 = MODEL_FILES["dm0.5"]
DM10 = MODEL_FILES["dm1.0"]
PREFIX = "edge-agent"


def kib_status(pid: int, key: str) -> Optional[int]:
    """A ``/proc/<pid>/status`` value in KiB (VmRSS, VmHWM), None if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Watcher:
    """A plain paho subscriber: retained availability of every device, and deploy chunks."""

    def __init__(self, port: int) -> None:
        self.online: Dict[str, float] = {}
        self.chunks: List[str] = []
        self.lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(
            [(f"{PREFIX}/+/availability", 1), (f"{PREFIX}/+/cmd/deploy/+/chunk/+", 1)])
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, 60)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self.lock:
            if msg.topic.endswith("/availability"):
                dev = msg.topic.split("/")[1]
                if msg.payload == b"online":
                    self.online.setdefault(dev, time.monotonic())
                else:
                    self.online.pop(dev, None)
            else:
                self.chunks.append(msg.topic)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def write_agent(root: Path, device: str, port: int, fps: float) -> Path:
    d = root / device
    d.mkdir(parents=True)
    (d / "agent.toml").write_text(f"""[agent]
device_id = "{device}"
log_level = "warning"
state_dir = "{d / 'state'}"

[source]
kind = "synthetic"
width = 320
height = 240
fps = {fps}

[model]
path = "{DM05}"
labels = "{LABELS}"
threads = 1

[publish]
stats_interval_s = 60.0

[mqtt]
host = "127.0.0.1"
port = {port}
reconnect_min_s = 0.5
reconnect_max_s = 5.0
""")
    return d / "agent.toml"


def run_cli(args: List[str], timeout: float) -> Tuple[int, str, str, float, int]:
    """``edge-agent <args>`` as a process: (rc, stdout, stderr, wall s, peak RSS KiB via wait4)."""
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out: List[str] = []
    err: List[str] = []
    readers = [threading.Thread(target=lambda s=s, b=b: b.append(s.read()), daemon=True)
               for s, b in ((proc.stdout, out), (proc.stderr, err))]
    for r in readers:
        r.start()
    deadline = start + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    wall = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    for r in readers:
        r.join(5)
    return proc.returncode, "".join(out), "".join(err), wall, int(usage.ru_maxrss)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=50)
    ap.add_argument("--fps", type=float, default=0.2, help="each agent's camera frame rate (default 0.2)")
    ap.add_argument("--runs", type=int, default=5, help="benchmark runs per agent (default 5)")
    ap.add_argument("--out", type=Path, default=None, help="directory for fleet_scale.json")
    args = ap.parse_args(argv)
    for path in (DM05, DM10, LABELS):
        if not path.is_file():
            raise SystemExit(f"cannot read {path} (is ../shared/test_data there?)")
    work = Path(tempfile.mkdtemp(prefix="edge-agent-fleet-scale-"))
    (work / "broker").mkdir()
    broker = MosquittoBroker(workdir=str(work / "broker")).start()  # mosquitto's defaults
    report: Dict[str, Any] = {"agents": args.agents, "fps": args.fps, "runs": args.runs, "cpus": os.cpu_count(),
                              "model": DM05.name, "deployed": DM10.name, "steps": {}}
    procs: List[subprocess.Popen] = []
    watcher = Watcher(broker.port)
    devices = [f"scale-{i:02d}" for i in range(args.agents)]
    common = ["--host", "127.0.0.1", "--port", str(broker.port)]
    failed = False

    def step(name: str, wall: float, ok: bool, detail: str, client_kib: Optional[int] = None) -> None:
        nonlocal failed
        failed |= not ok
        report["steps"][name] = {"seconds": round(wall, 2), "ok": ok, "detail": detail,
                                 "client_peak_rss_mb": round(client_kib / 1024, 1) if client_kib else None,
                                 "broker_peak_rss_mb": round((kib_status(broker.pid, "VmHWM") or 0) / 1024, 1)}
        r = report["steps"][name]
        print(f"{name:9s} {wall:7.1f} s  {'ok ' if ok else 'FAIL'}  client {r['client_peak_rss_mb'] or '-':>6} MB  "
              f"broker {r['broker_peak_rss_mb']:>5} MB  {detail}", flush=True)

    try:
        start = time.monotonic()
        for dev in devices:
            config = write_agent(work, dev, broker.port, args.fps)
            log = open(work / dev / "agent.log", "wb")
            procs.append(subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                                          stdout=log, stderr=subprocess.STDOUT))
            log.close()
        deadline = start + 600
        while time.monotonic() < deadline:
            with watcher.lock:
                n = len(watcher.online)
            if n >= args.agents or any(p.poll() is not None for p in procs):
                break
            time.sleep(0.2)
        with watcher.lock:
            n = len(watcher.online)
            last = max(watcher.online.values()) if watcher.online else time.monotonic()
        step("start-up", last - start, n == args.agents, f"{n}/{args.agents} agents online")

        rc, out, err, wall, kib = run_cli(["remote", "devices", "--json", "--discover-s", "10", *common], 120)
        listed = json.loads(out) if rc == 0 and out.strip() else {}
        both = sum(1 for v in listed.values() if set(v["via"]) == {"retained", "presence"})
        step("devices", wall, len(listed) == args.agents and all(v["online"] for v in listed.values()),
             f"{len(listed)} listed, {both} by retained state and presence ({err.strip().splitlines()[-1:]})", kib)

        bench_json = work / "bench.json"
        rc, out, err, wall, kib = run_cli(["remote", "bench", "--all", "--runs", str(args.runs), "--warmup", "1",
                                           "--progress", "none", "--timeout", "600", "--discover-s", "3",
                                           "--json", str(bench_json), *common], 900)
        results = json.loads(bench_json.read_text())["devices"] if bench_json.exists() else {}
        done = [d for d, e in results.items() if e["status"] == "done" and e.get("result")]
        p50s = sorted(e["result"]["invoke"]["p50"] for d, e in results.items() if d in done)
        med = p50s[len(p50s) // 2] if p50s else float("nan")
        step("bench", wall, rc == 0 and len(done) == args.agents,
             f"{len(done)}/{args.agents} results; median of the agents' invoke p50 {med:.1f} ms", kib)

        chunk = 256 * 1024
        n_chunks = math.ceil(DM10.stat().st_size / chunk)
        with watcher.lock:
            watcher.chunks.clear()
        rc, out, err, wall, kib = run_cli(["remote", "deploy", str(DM10), "--all", "--name", "dm10",
                                           "--chunk-size", str(chunk), "--confirm-frames", "1",
                                           "--timeout", "600", "--discover-s", "3", *common], 900)
        active = sum(1 for line in out.splitlines()[1:] if " done " in f" {line} " and "active" in line)
        time.sleep(1.0)  # the watcher's copies of the last chunks (already PUBACKed to the CLI)
        with watcher.lock:
            chunks = list(watcher.chunks)
        fleet = sum(1 for t in chunks if t.split("/")[1] == "all")
        step("deploy", wall, rc == 0 and active == args.agents and fleet == n_chunks == len(chunks),
             f"{active}/{args.agents} active; {len(chunks)} chunk messages for {n_chunks} chunks "
             f"({fleet} on the fleet topic)", kib)

        rss = [kib_status(p.pid, "VmRSS") or 0 for p in procs]
        hwm = [kib_status(p.pid, "VmHWM") or 0 for p in procs]
        report["agents_rss_mb"] = {"total": round(sum(rss) / 1024), "per_agent_median": round(sorted(rss)[len(rss) // 2] / 1024, 1),
                                   "per_agent_peak_max": round(max(hwm) / 1024, 1)}
        report["broker_peak_rss_mb"] = round((kib_status(broker.pid, "VmHWM") or 0) / 1024, 1)
        print(f"agents: RSS {report['agents_rss_mb']['total']} MB in all, median "
              f"{report['agents_rss_mb']['per_agent_median']} MB each (peak {report['agents_rss_mb']['per_agent_peak_max']} MB); "
              f"broker peak {report['broker_peak_rss_mb']} MB; {os.cpu_count()} CPUs")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        watcher.close()
        broker.close()
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fleet_scale.json").write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
