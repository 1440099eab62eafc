#!/usr/bin/env python3
"""edge-agent store-and-forward benchmark: a broker outage with an agent restart in the middle.

    .venv/bin/python bench/outbox.py [--outage-s 60] [--cameras 2] [--fps 5] [--replay-hz 50]

The real agent (``python -m edge_agent run``) with ``--cameras`` synthetic cameras at ``--fps``
each (~10 results/s in total by default, a mask with every result) publishes to a real mosquitto
(persistence on) drained by a consumer with a persistent session (QoS 1, what a consumer that must
miss nothing does). After a warm-up the broker is stopped for ``--outage-s``; half-way through the
agent is SIGKILLed and started again (the broker still down). Then the broker comes back and the
agent replays its outbox.

Printed: results produced (per camera and run, from the first to the last seq: the sources do
not skip seqs) vs delivered (none missing is the target), duplicates (all with the same seq),
replay order per camera, the catch-up time (broker back -> ``stats.outbox.messages == 0``) and
the live results per second per camera during the catch-up as a ratio of the rate before the
outage (1.0 = the replay did not slow live frames). Exit status 1 when a result is missing, a
duplicate has another seq, or the replay is out of order. Numbers: docs/performance.md
("Store-and-forward").
"""

from __future__ import annotations

import argparse
import json
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from perf import LABELS, MODEL_FILES, REPO  # run as a script: bench/ is on sys.path

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from edge_agent.comms.broker import MosquittoBroker  # noqa: E402

DEVICE = "outbox-bench"
PREFIX = "edge-agent"


def write_config(path: Path, port: int, cameras: int, fps: float, replay_hz: float) -> Path:
    lines = [f'[agent]\ndevice_id = "{DEVICE}"\nstate_dir = "{path.parent / "state"}"\n',
             f'[model]\npath = "{MODEL_FILES["dm0.5"]}"\nlabels = "{LABELS}"\n',
             f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\nreconnect_min_s = 0.2\nreconnect_max_s = 1.0\n',
             '[publish]\nstats_interval_s = 1.0\n',
             f'[outbox]\nreplay_max_hz = {replay_hz}\n']
    for i in range(cameras):
        lines.append(f'[[cameras]]\nid = "cam{i}"\nkind = "synthetic"\nwidth = 320\nheight = 240\nfps = {fps}\n')
    path.write_text("\n".join(lines))
    return path


class Consumer:
    """A persistent-session QoS 1 subscriber to everything the device publishes."""

    def __init__(self, port: int) -> None:
        self.results: List[Tuple[float, str, Dict[str, Any]]] = []  # (arrival, camera, doc)
        self.masks = {"live": 0, "replayed": 0}
        self.stats: Optional[Dict[str, Any]] = None
        self.lock = threading.Lock()
        ready = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="outbox-bench-consumer",
                                  protocol=paho.MQTTv5)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{PREFIX}/{DEVICE}/#", qos=1)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.05, 0.2)
        self.client.connect_async("127.0.0.1", port, 30, clean_start=False, properties=props)
        self.client.loop_start()
        if not ready.wait(10):
            raise RuntimeError("the consumer could not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        kind = msg.topic.rsplit("/", 1)[-1]
        replayed = dict(getattr(msg.properties, "UserProperty", []) or []).get("replayed") == "true"
        with self.lock:
            if kind == "result":
                doc = json.loads(msg.payload)
                self.results.append((time.time(), doc.get("camera", ""), doc))
            elif kind == "mask":
                self.masks["replayed" if replayed else "live"] += 1
            elif kind == "stats":
                self.stats = json.loads(msg.payload)

    def outbox(self) -> Optional[Dict[str, Any]]:
        with self.lock:
            return (self.stats or {}).get("outbox")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def kept_results(db: Path) -> set:
    """(camera, capture_ts) of the results in the outbox now."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute("SELECT payload FROM outbox WHERE bucket = 'results'").fetchall()
    finally:
        conn.close()
    return {(d.get("camera", ""), d["capture_ts"]) for d in (json.loads(p) for (p,) in rows)}


def kept(db: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--outage-s", type=float, default=60.0)
    ap.add_argument("--cameras", type=int, default=2)
    ap.add_argument("--fps", type=float, default=5.0, help="per camera")
    ap.add_argument("--replay-hz", type=float, default=50.0, help="outbox.replay_max_hz")
    ap.add_argument("--warmup-s", type=float, default=15.0)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="edge-agent-outbox-bench-") as tmp:
        work = Path(tmp)
        broker = MosquittoBroker(extra_conf=["persistence true", f"persistence_location {work}/",
                                             "max_queued_messages 1000000"], workdir=str(work))
        broker.start()
        consumer = Consumer(broker.port)
        config = write_config(work / "agent.toml", broker.port, args.cameras, args.fps, args.replay_hz)
        db = work / "state" / "outbox.sqlite3"
        logs = [open(work / f"agent-{i}.log", "wb") for i in (1, 2)]
        cmd = [sys.executable, "-m", "edge_agent", "run", "--config", str(config)]
        agent = subprocess.Popen(cmd, stdout=logs[0], stderr=subprocess.STDOUT, cwd=REPO)
        try:
            wait(lambda: len(consumer.results) >= 5, 120, "the first results")
            t_warm = time.time()
            time.sleep(args.warmup_s)
            t_outage = time.time()
            with consumer.lock:
                stats_before = dict(consumer.stats or {})
            broker.stop()
            print(f"broker stopped for {args.outage_s:.0f} s", flush=True)
            time.sleep(args.outage_s / 2)
            before_kill = kept(db)
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
            t_kill = time.time()
            k1 = kept_results(db)
            agent = subprocess.Popen(cmd, stdout=logs[1], stderr=subprocess.STDOUT, cwd=REPO)
            print(f"agent SIGKILLed with {before_kill} messages in its outbox, started again", flush=True)
            time.sleep(max(0.0, t_outage + args.outage_s - time.time()))
            backlog = kept(db)
            broker.start()
            t_back = time.time()
            print(f"broker back; {backlog} messages in the outbox", flush=True)

            def drained() -> bool:
                box = consumer.outbox()
                return bool(box) and box.get("messages") == 0 and box.get("replayed", 0) > 0
            wait(drained, 600, "the outbox to drain")
            t_drained = time.time()
            time.sleep(5.0)  # live results after the catch-up
            with consumer.lock:
                seen = id(consumer.stats)
            wait(lambda: id(consumer.stats) != seen, 30, "a fresh stats document")
            agent.send_signal(signal.SIGTERM)
            agent.wait(30)
            time.sleep(1.0)
            final_box = consumer.outbox() or {}
            final_stats = consumer.stats or {}
        finally:
            if agent.poll() is None:
                agent.kill()
            consumer.close()
            broker.stop()
            for f in logs:
                f.close()

    results = consumer.results
    ok = True
    # identity of a frame: (camera, capture_ts); run 1 = captured before the SIGKILL
    frames: Dict[Tuple[str, float], set] = {}
    for _, cam, doc in results:
        frames.setdefault((cam, doc["capture_ts"]), set()).add(doc["seq"])
    dup_other_seq = sum(len(s) > 1 for s in frames.values())
    duplicates = len(results) - len(frames)
    k1_missing = len(k1 - set(frames))
    cams = (final_stats.get("cameras") or {})
    run2_drops = {c: sum((v.get("dropped") or {}).values()) for c, v in cams.items()}
    produced = delivered = 0
    rows = []
    for cam in sorted({c for c, _ in frames}):
        for run, select in (("1", lambda ts: ts <= t_kill), ("2", lambda ts: ts > t_kill)):
            seqs = sorted({min(s) for (c, ts), s in frames.items() if c == cam and select(ts)})
            if not seqs:
                continue
            expect = seqs[-1] - seqs[0] + 1
            produced += expect
            delivered += len(seqs)
            if run == "2":
                note = f", frames dropped by the pipeline {run2_drops.get(cam)}"
            else:  # the killed run: the pipeline's drops are known up to the last stats before the outage
                last_live = max((doc["seq"] for _, c, doc in results if c == cam and not doc.get("replayed")
                                 and doc["capture_ts"] <= t_outage), default=seqs[0])
                before = sum(1 for q in range(seqs[0], last_live + 1) if q not in set(seqs))
                drops = sum(((stats_before.get("cameras") or {}).get(cam, {}).get("dropped") or {}).values())
                note = (f" (before the outage {before}, the pipeline had dropped {drops} by its last stats;"
                        f" during it {expect - len(seqs) - before})")
            rows.append(f"  camera {cam or '-'} run {run}: seq {seqs[0]}..{seqs[-1]}: "
                        f"{expect} seqs, delivered {len(seqs)}, gaps {expect - len(seqs)}{note}")
    order_ok = True
    for cam in {c for c, _ in frames}:
        replay_ts = [doc["capture_ts"] for _, c, doc in results if c == cam and doc.get("replayed")]
        order_ok &= replay_ts == sorted(replay_ts)
    catch_up = t_drained - t_back

    def live_rate(t0: float, t1: float) -> float:
        n = sum(1 for _, _, doc in results if not doc.get("replayed") and t0 <= doc["capture_ts"] < t1)
        return n / max(1e-9, t1 - t0) / max(1, args.cameras)

    before = live_rate(t_warm, t_outage)
    during = live_rate(t_back + 1.0, t_drained)  # after the reconnect itself
    replayed = sum(1 for _, _, doc in results if doc.get("replayed"))
    print(f"outage {args.outage_s:.0f} s, {args.cameras} cameras x {args.fps:g} fps, replay_max_hz {args.replay_hz:g}")
    print("\n".join(rows))
    print(f"results kept in the outbox at the SIGKILL: {len(k1)}, not delivered: {k1_missing}")
    print(f"results: seqs {produced}, delivered {delivered}, gaps {produced - delivered}, "
          f"duplicates {duplicates} (with another seq: {dup_other_seq}), replayed {replayed}")
    print(f"masks: live {consumer.masks['live']}, replayed {consumer.masks['replayed']}; "
          f"outbox at the end: {json.dumps(final_box)}")
    print(f"replay in capture order per camera: {order_ok}")
    print(f"frames dropped by the pipeline (run 2): {json.dumps(final_stats.get('dropped'))}; "
          f"mqtt: { {k: final_stats.get('mqtt', {}).get(k) for k in ('published', 'dropped', 'inflight')} }")
    print(f"catch-up: {catch_up:.1f} s for {backlog} messages ({backlog / max(catch_up, 1e-9):.1f} msg/s)")
    print(f"live results/s per camera: before the outage {before:.2f}, during the catch-up {during:.2f} "
          f"(ratio {during / before if before else float('nan'):.2f})")
    ok = k1_missing == 0 and dup_other_seq == 0 and order_ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
