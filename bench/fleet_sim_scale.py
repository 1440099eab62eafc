#!/usr/bin/env python3
"""The fleet tools and the console with 1,000 simulated devices (bench/fleet_sim.py) on one mosquitto.

    .venv/bin/python bench/fleet_sim_scale.py [--devices 1000] [--fps 0.2] [--json out.json] [--no-browser]
    .venv/bin/python bench/fleet_sim_scale.py --bridged [--bridge-qos 1] [--site-set LINE ...] [--bridge-set LINE ...]

``--bridged``: two mosquittos and a bridge (tests/broker.py ``bridged_mosquittos``, as in
docs/brokers.md: ``topic edge-agent/# both QOS``): the devices on the site broker, every tool
(remote devices/bench/rollout, the console, the result counter) on the central one, so every
command crosses the bridge down and every device message up. ``--site-set`` adds a line to the
site broker's config (the bridge is a client there: ``max_queued_messages 10000``),
``--bridge-set`` one to the bridge connection on the central broker.

One run measures, one after the other (the host CLI and the console are real processes):

* online     every device's MQTT session up (the simulator in this process, one network thread);
* devices    ``edge-agent remote devices --json``: all listed (target < 10 s);
* bench      ``edge-agent remote bench --all``: an answer from every device;
* rollout    ``edge-agent remote rollout --all --stages 1,10,50%,100%``: a model 10x slower; one
             stage-2 device is model-bound (the others paced; the 10 devices of stages 1+2 at 2
             fps), so its fps gate fails at stage 2 and the 10 devices of stages 1+2 are rolled
             back (checked on the devices themselves);
* console    ``edge-agent console``: ``/api/devices`` time and size, the console's CPU over 20 s and
             its peak RSS (target < 300 MB), and the fleet page rendered in headless chromium
             (navigation -> fleet table filled; target < 1 s);
* messages   every ``result`` a device handed to its client, counted again by a subscriber in its
             own process (``--count-results``: the simulator's GIL does not slow it down).

Between steps: how many devices are still connected and how many connection attempts the
simulator made (1,000 at the start; more means connections were lost and re-made).

Prints one line per step and writes the numbers as JSON with --json. Results: docs/performance.md
("Simulated fleet of 1,000").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter as Counter_
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from bench.fleet_scale import kib_status, run_cli  # noqa: E402
from bench.fleet_sim import Costs, FleetSim, fake_model_bytes  # noqa: E402
from edge_agent.comms.broker import MosquittoBroker, free_port  # noqa: E402
from tests.broker import bridged_mosquittos  # noqa: E402  (the bridge config the broker matrix tests)

PREFIX = "edge-agent"
NEW_MODEL_MS, BASE_MS = 400.0, 40.0
GATED_FPS = 2.0


def count_results(port: int, out: Path) -> int:
    """``--count-results``: a plain paho subscriber (QoS 1) counting result messages; writes the
    count to ``out`` twice a second and prints ``ready`` once subscribed. Ends on SIGTERM."""
    import signal
    count = [0]
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{PREFIX}/+/result", 1)
    client.on_subscribe = lambda c, u, mid, codes, p: print("ready", flush=True)

    def on_message(c: Any, u: Any, msg: Any) -> None:
        count[0] += 1
    client.on_message = on_message
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    client.connect("127.0.0.1", port, 60)
    client.loop_start()
    while not stop.wait(0.5):
        out.write_text(str(count[0]))
    client.disconnect()
    client.loop_stop()
    out.write_text(str(count[0]))
    return 0


def wait_bridge(site_port: int, central_port: int, timeout: float = 30.0) -> float:
    """Seconds until a message published on the site broker reaches the central one."""
    got = threading.Event()
    sub = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    subscribed = threading.Event()
    sub.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{PREFIX}/bridge-probe/#", 0)
    sub.on_subscribe = lambda c, u, mid, codes, p: subscribed.set()
    sub.on_message = lambda c, u, m: got.set()
    sub.connect("127.0.0.1", central_port, 30)
    sub.loop_start()
    pub = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    pub.connect("127.0.0.1", site_port, 30)
    pub.loop_start()
    t0 = time.monotonic()
    try:
        subscribed.wait(timeout)
        while not got.is_set() and time.monotonic() - t0 < timeout:
            pub.publish(f"{PREFIX}/bridge-probe/x", b"1", qos=0)
            got.wait(0.2)
        if not got.is_set():
            raise RuntimeError(f"the bridge carried nothing within {timeout:.0f} s")
        return time.monotonic() - t0
    finally:
        for c in (sub, pub):
            c.disconnect()
            c.loop_stop()


class Counter:
    """The result counter in its own process (see :func:`count_results`)."""

    def __init__(self, port: int, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen([sys.executable, __file__, "--count-results", str(port), str(out)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    @property
    def results(self) -> int:
        try:
            return int(self.out.read_text() or 0)
        except (OSError, ValueError):
            return 0

    def settle(self, expected: int, timeout: float = 60.0) -> int:
        """The count once it reaches ``expected`` or stops growing for 5 s."""
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            n = self.results
            if n >= expected:
                return n
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since > 5.0:
                break
            time.sleep(0.5)
        return self.results

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def broker_log(broker: MosquittoBroker) -> Dict[str, int]:
    """What a broker's log says about drops and the bridge (mosquitto logs a queue overflow once
    per client: 'Outgoing messages are being dropped for client ...')."""
    try:
        text = broker.log_path.read_text(errors="replace")
    except OSError:
        return {}
    return {"drop_notices": text.count("are being dropped"), "bridge_connects": text.count("Connecting bridge (step 1)")}


class SysDropped:
    """The broker's own count of publishes it dropped (``$SYS/broker/publish/messages/dropped``,
    published on change every ``sys_interval``; retained with a 60 s expiry, so it is watched
    from the start rather than read at the end)."""

    TOPIC = "$SYS/broker/publish/messages/dropped"
    UPTIME = "$SYS/broker/uptime"  # changes every sys_interval: the broker's clock

    def __init__(self, port: int) -> None:
        self.value: Optional[int] = None
        self.ticks = 0
        self._cond = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(self.TOPIC, 0), (self.UPTIME, 0)])
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        with self._cond:
            if msg.topic == self.TOPIC:
                self.value = int(msg.payload or 0)
            else:
                self.ticks += 1
            self._cond.notify_all()

    def wait(self, timeout: float = 20.0) -> Optional[int]:
        """The count once the broker published its $SYS tree twice more (a drop until now is in it)."""
        with self._cond:
            until = self.ticks + 2
            self._cond.wait_for(lambda: self.ticks >= until and self.value is not None, timeout)
            return self.value

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def render_fleet_page(url: str, devices: int) -> Dict[str, Any]:
    """Load the console in headless chromium; ms from navigation until the fleet table is filled."""
    sys.path.insert(0, str(REPO))
    from tests.helpers import chromium  # Debian's chromium + chromedriver through Selenium

    profile = Path(tempfile.mkdtemp(prefix="fleet-sim-chromium-"))
    driver = chromium(profile)
    try:
        driver.get("about:blank")
        t0 = time.monotonic()
        driver.get(url)
        deadline = t0 + 60
        rows = 0
        while time.monotonic() < deadline:
            rows = driver.execute_script("return document.querySelectorAll('#fleet tbody tr').length")
            summary = driver.execute_script("return document.getElementById('fleet-summary').textContent")
            if rows and str(devices) in summary.replace(",", "").replace("\u202f", "").replace(" ", ""):
                break
            time.sleep(0.02)
        wall_ms = (time.monotonic() - t0) * 1e3
        page_ms = driver.execute_script("return performance.now()")
        summary = driver.execute_script("return document.getElementById('fleet-summary').textContent")
        return {"wall_ms": round(wall_ms), "page_ms": round(page_ms), "rows_shown": rows, "summary": summary}
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--fps", type=float, default=0.2, help="each device's frame rate (default 0.2)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-browser", action="store_true")
    ap.add_argument("--bridged", action="store_true", help="devices on a site broker, tools on a central one bridged to it")
    ap.add_argument("--bridge-qos", type=int, default=1, choices=(0, 1, 2), help="the bridge topic's QoS (default 1)")
    ap.add_argument("--site-set", action="append", default=[], metavar="LINE", help="a site broker config line")
    ap.add_argument("--bridge-set", action="append", default=[], metavar="LINE", help="a bridge connection config line")
    ap.add_argument("--count-results", nargs=2, metavar=("PORT", "FILE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.count_results:
        return count_results(int(args.count_results[0]), Path(args.count_results[1]))
    work = Path(tempfile.mkdtemp(prefix="edge-agent-fleet-sim-scale-"))
    if args.bridged:
        site, broker = bridged_mosquittos(work / "bridge", qos=args.bridge_qos, site_conf=["sys_interval 1", *args.site_set],
                                          bridge_conf=args.bridge_set)
        print(f"bridge up in {wait_bridge(site.port, broker.port):.2f} s (topic edge-agent/# both "
              f"{args.bridge_qos}; site {args.site_set or 'defaults'}; bridge {args.bridge_set or 'defaults'})",
              flush=True)
    else:
        (work / "broker").mkdir()
        site = broker = MosquittoBroker(workdir=str(work / "broker")).start()
    site_drops = SysDropped(site.port) if site is not broker else None
    new_model = fake_model_bytes("rollout-model")
    import hashlib
    new_sha = hashlib.sha256(new_model).hexdigest()
    (work / "new.tflite").write_bytes(new_model)
    slow_device = "sim-0005"  # in stage 2 (devices 2..10): model-bound, the others are paced
    # The devices of stages 1+2 run at 2 fps: fps is measured per second, and at 0.2 fps a
    # window holds 0 or 1 frame, so a paced device's fps gate would fail on noise alone.
    gated = {f"sim-{i:04d}": GATED_FPS for i in range(min(10, args.devices))}
    costs = Costs({new_sha: NEW_MODEL_MS}, default_ms=BASE_MS, fps=args.fps,
                  device_fps={**gated, slow_device: 0.0})
    counter = Counter(broker.port, work / "results.count")
    report: Dict[str, Any] = {"devices": args.devices, "fps": args.fps, "cpus": os.cpu_count(),
                              "bridged": {"qos": args.bridge_qos, "site": args.site_set, "bridge": args.bridge_set}
                              if args.bridged else None,
                              "loadavg_start": os.getloadavg(), "steps": {}}
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the start", flush=True)
    common = ["--host", "127.0.0.1", "--port", str(broker.port)]
    failed = False
    console: Optional[subprocess.Popen] = None

    def step(name: str, seconds: float, ok: bool, detail: str, **extra: Any) -> None:
        nonlocal failed
        failed |= not ok
        report["steps"][name] = {"seconds": round(seconds, 2), "ok": ok, "detail": detail, **extra,
                                 "broker_peak_rss_mb": round((kib_status(broker.pid, "VmHWM") or 0) / 1024, 1),
                                 "site_broker_peak_rss_mb": round((kib_status(site.pid, "VmHWM") or 0) / 1024, 1),
                                 "connected_after": sim.connected(), "connection_attempts": sim.net.reconnects,
                                 "loadavg": os.getloadavg()[0]}
        print(f"{name:9s} {seconds:7.2f} s  {'ok ' if ok else 'FAIL'}  {detail}  "
              f"[{sim.connected()} connected, {sim.net.reconnects} connection attempts, "
              f"load {os.getloadavg()[0]:.1f}]", flush=True)

    sim = FleetSim(args.devices, work / "sim", port=site.port, costs=costs)
    try:
        t0 = time.monotonic()
        sim.start()
        n = sim.wait_connected(300)
        sim_rss = (kib_status(os.getpid(), "VmRSS") or 0) / 1024
        step("online", time.monotonic() - t0, n == args.devices,
             f"{n}/{args.devices} connected; simulator {threading.active_count()} threads, RSS {sim_rss:.0f} MB")

        rc, out, err, wall, kib = run_cli(["remote", "devices", "--json", "--discover-s", "3", *common], 300)
        listed = json.loads(out) if rc == 0 and out.strip() else {}
        online = sum(1 for v in listed.values() if v.get("online"))
        step("devices", wall, online == args.devices and wall < 10,
             f"{online}/{args.devices} listed online (target < 10 s; --discover-s 3 included); "
             f"CLI peak RSS {kib / 1024:.0f} MB", client_peak_rss_mb=round(kib / 1024, 1))

        bench_json = work / "bench.json"
        rc, out, err, wall, kib = run_cli(["remote", "bench", "--all", "--runs", "3", "--warmup", "1",
                                           "--progress", "none", "--timeout", "300", "--discover-s", "3",
                                           "--json", str(bench_json), *common], 600)
        results = json.loads(bench_json.read_text())["devices"] if bench_json.exists() else {}
        done = sum(1 for e in results.values() if e.get("status") == "done" and e.get("result"))
        others = Counter_(f"{e.get('status')}: {e.get('reason')}" for e in results.values() if e.get("status") != "done")
        step("bench", wall, done == args.devices, f"{done}/{args.devices} answers done {dict(others.most_common(3))}; "
             f"{len(results)} in the report; CLI peak RSS "
             f"{kib / 1024:.0f} MB", client_peak_rss_mb=round(kib / 1024, 1))

        state = work / "rollout.json"
        base_sha = sim.running()[sim.ids[0]]
        rc, out, err, wall, kib = run_cli(["remote", "rollout", str(work / "new.tflite"), "--all",
                                           "--stages", "1,10,50%,100%", "--soak-s", "10", "--baseline-s", "10",
                                           "--fps-ratio", "0.8", "--p50-ratio", "0", "--chunk-size", "8192",
                                           "--state", str(state), "--timeout", "300", "--discover-s", "3",
                                           *common], 1200)
        doc = json.loads(state.read_text()) if state.exists() else {}
        stages = [s.get("status") for s in doc.get("stages", [])]
        changed = [d for s in doc.get("stages", [])[:2] for d in s["devices"]]
        running = sim.running()
        back = all(running[d] == base_sha for d in changed) and set(doc.get("rolled_back", {})) == set(changed)
        untouched = all(not d.models.store.has(new_sha) for d in sim.devices
                        if d.config.agent.device_id not in changed)
        fails = [line for line in out.splitlines() if " failed " in line]
        step("rollout", wall, rc == 1 and stages == ["passed", "failed", "pending", "pending"] and back and untouched,
             f"stages {stages}; {len(changed)} devices of stages 1+2 rolled back "
             f"({sum(1 for v in doc.get('rolled_back', {}).values() if v == 'done')} done), all on the old model: "
             f"{back}; the other {args.devices - len(changed)} never got it: {untouched}; {fails[:1]}"
             + ("" if rc == 1 and "failed" in stages else f"; CLI rc {rc}: {err.strip().splitlines()[-3:]}"),
             client_peak_rss_mb=round(kib / 1024, 1))

        port = free_port()
        log = open(work / "console.log", "wb")
        console = subprocess.Popen([sys.executable, "-m", "edge_agent", "console", "--listen", f"127.0.0.1:{port}",
                                    "--discover-s", "3", *common], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        count, api_ms, size = 0, 0.0, 0
        while time.monotonic() < deadline:
            try:
                t = time.monotonic()
                body = urllib.request.urlopen(f"{url}/api/devices", timeout=30).read()
                api_ms, size = (time.monotonic() - t) * 1e3, len(body)
                doc = json.loads(body)
                devs = doc.get("devices", doc) if isinstance(doc, dict) else doc
                count = len(devs)
                if count >= args.devices:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        times = []
        for _ in range(5):
            t = time.monotonic()
            urllib.request.urlopen(f"{url}/api/devices", timeout=30).read()
            times.append((time.monotonic() - t) * 1e3)
        c0, w0 = cpu_s(console.pid), time.monotonic()
        time.sleep(20)
        cpu = (cpu_s(console.pid) - c0) / (time.monotonic() - w0) * 100
        page = None if args.no_browser else render_fleet_page(url, args.devices)
        peak = (kib_status(console.pid, "VmHWM") or 0) / 1024
        ok = count >= args.devices and peak < 300 and (page is None or page["wall_ms"] < 1000)
        step("console", sorted(times)[2] / 1e3, ok,
             f"/api/devices: {count} devices, {size / 1024:.0f} KiB, median {sorted(times)[2]:.0f} ms; "
             f"CPU {cpu:.1f} % of a core with {args.devices} devices streaming; peak RSS {peak:.0f} MB "
             f"(target < 300); fleet page {page}", api_ms=round(sorted(times)[2]), cpu_percent=round(cpu, 1),
             peak_rss_mb=round(peak), page=page)
    finally:
        if console is not None:
            console.terminate()
            console.wait(30)
        t = time.monotonic()
        sim.stop()
        sent = sim.frame_messages
        got = counter.settle(sent)  # the last results on their way to the counter
        counter.close()
        totals = sim.mqtt_totals()
        site_dropped = None
        if site_drops is not None:
            site_dropped = site_drops.wait()
            site_drops.close()
        step("messages", time.monotonic() - t, got == sent and not site_dropped,
             f"{got} results received of {sent} the devices' clients took ({sent - got} lost); the clients "
             f"dropped {totals.get('dropped', 0)} messages in all (none taken: broker away or in-flight full); "
             f"simulator clock ticks late: {sim.late_ticks} of {sim.ticks} (the machine is the limit when many); "
             f"load average {os.getloadavg()[0]:.2f}"
             + (f"; the site broker dropped {site_dropped} publishes ($SYS); site broker log {broker_log(site)}, "
                f"central broker log {broker_log(broker)}" if site is not broker
                else f"; broker log {broker_log(broker)}"), site_broker_dropped=site_dropped)
        broker.close()
        if site is not broker:
            site.close()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
