#!/usr/bin/env python3
"""Several cameras on one agent (issue 26 item 1): total masks/s, each camera's share, RSS.

    .venv/bin/python bench/cameras.py [--rounds 2] [--window 15] [--model dm1.0]

The real daemon (``python -m edge_agent run``) with 1, 2 and 4 ``[[cameras]]`` read at full speed
(fps = 0, loop), publishing to a real mosquitto, the inference layout left automatic (all cores).
Two mixes: ``jpeg`` (folder cameras alternating 1080p and 720p JPEGs, bench/perf.py's photos)
and ``raw`` (the synthetic 1280x720 pattern: no decode). Per run:

* total masks/s x ``invoke()`` alone (one interpreter, a thread per core, measured in this
  process just before and after the run: the same drift) = the ratio to 1/invoke;
* each camera's masks/s / (total / cameras) = its share of the fair share (1.00 = fair);
* the agent's peak RSS (VmHWM) and its ratio to the one-camera run of the same mix.

Configurations alternate in rounds; medians are reported. Targets (issue 26): ratio >= 0.90,
every camera within +-10% of its fair share, RSS(4 cameras) <= 1.3 x RSS(1 camera).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from perf import (  # noqa: E402
    LABELS, MODEL_FILES, agent_bench, log, make_sources, median, standalone_invoke, stop_agent, vm_hwm_mb,
)

COUNTS = (1, 2, 4)
MIXES = ("jpeg", "raw")


class CameraCounter:
    """Counts masks per camera topic (``.../camera/<id>/mask``)."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.counts: Counter = Counter()
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-cams-{os.getpid()}")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("edge-agent/bench-cams/camera/+/mask", qos=0)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.counts[msg.topic.split("/")[3]] += 1

    def snapshot(self) -> Counter:
        with self._lock:
            return Counter(self.counts)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def write_config(path: Path, port: int, model: Path, cameras: List[List[str]]) -> Path:
    lines = ["[agent]", 'device_id = "bench-cams"', 'log_level = "warning"', f'state_dir = "{path.parent / "state"}"',
             "[model]", f'path = "{model}"', f'labels = "{LABELS}"',
             "[mqtt]", 'host = "127.0.0.1"', f"port = {port}",
             "[publish]", 'timings = "interval"', "timings_interval_s = 5.0", "stats_interval_s = 5.0"]
    for i, source in enumerate(cameras):
        lines += ["[[cameras]]", f'id = "cam{i}"', *source, "loop = true", "fps = 0.0"]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_once(port: int, counter: CameraCounter, cfg: Path, n: int, window_s: float, warmup_s: float) -> Dict[str, Any]:
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=str(REPO))
    try:
        deadline = time.monotonic() + 60
        while len(counter.snapshot()) < n and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(warmup_s)
        c0, t0 = counter.snapshot(), time.monotonic()
        time.sleep(window_s)
        c1, t1 = counter.snapshot(), time.monotonic()
        rss = vm_hwm_mb(proc.pid)
    finally:
        err = stop_agent(proc)
    per_camera = {f"cam{i}": (c1[f"cam{i}"] - c0[f"cam{i}"]) / (t1 - t0) for i in range(n)}
    return {"total": sum(per_camera.values()), "per_camera": per_camera, "rss_mb": rss,
            "stderr": err.decode(errors="replace")[-300:]}


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--window", type=float, default=15.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--model", choices=sorted(MODEL_FILES), default="dm1.0")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    model = MODEL_FILES[args.model]
    cores = os.cpu_count() or 1
    results: Dict[tuple, List[Dict[str, Any]]] = {}
    invokes: Dict[tuple, List[float]] = {}
    with agent_bench("edge-agent-bench-cams-") as (tmp, broker), \
            contextlib.closing(CameraCounter(broker.port)) as counter:
        sources = make_sources(tmp)
        mixes = {"jpeg": [sources["jpeg-1080p"], sources["jpeg-720p"]], "raw": [sources["raw-720p"]]}
        for r in range(args.rounds):
            for mix in MIXES:
                for n in COUNTS:
                    cams = [mixes[mix][i % len(mixes[mix])] for i in range(n)]
                    cfg = write_config(tmp / f"agent-{mix}-{n}.toml", broker.port, model, cams)
                    invokes.setdefault((mix, n), []).extend(standalone_invoke(model, cores, 8))
                    res = run_once(broker.port, counter, cfg, n, args.window, args.warmup)
                    invokes[(mix, n)].extend(standalone_invoke(model, cores, 8))
                    results.setdefault((mix, n), []).append(res)
                    log(f"round {r + 1} {mix} x{n}: {res['total']:.2f} masks/s "
                        f"{ {k: round(v, 2) for k, v in res['per_camera'].items()} } rss {res['rss_mb']}"
                        + (f" stderr: {res['stderr']}" if not res["total"] else ""))
    rows = []
    for (mix, n), runs in results.items():
        inv = median(invokes[(mix, n)])
        total = median([r["total"] for r in runs])
        shares = {cam: median([r["per_camera"][cam] for r in runs]) / (total / n) if total else 0.0
                  for cam in runs[0]["per_camera"]}
        rss = median([r["rss_mb"] or 0.0 for r in runs])
        rows.append({"mix": mix, "cameras": n, "masks_per_s": round(total, 2), "invoke_ms": round(inv, 2),
                     "ratio_to_1_over_invoke": round(total * inv / 1e3, 3),
                     "shares": {k: round(v, 3) for k, v in shares.items()},
                     "worst_share_deviation": round(max(abs(v - 1) for v in shares.values()), 3),
                     "peak_rss_mb": round(rss, 1)})
    for row in rows:
        one = next(r for r in rows if r["mix"] == row["mix"] and r["cameras"] == 1)
        row["rss_vs_one_camera"] = round(row["peak_rss_mb"] / one["peak_rss_mb"], 3) if one["peak_rss_mb"] else None
    print(f"\nmodel {args.model}, {cores} cores, layout automatic, {args.rounds} rounds x {args.window:g} s, medians\n")
    print("| mix | cameras | masks/s | x invoke (ratio to 1/invoke) | worst share vs fair | shares | peak RSS MB | RSS vs 1 camera |")
    print("|---|---|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: (r["mix"], r["cameras"])):
        print(f"| {row['mix']} | {row['cameras']} | {row['masks_per_s']} | {row['ratio_to_1_over_invoke']} "
              f"(invoke {row['invoke_ms']} ms) | ±{row['worst_share_deviation'] * 100:.1f}% | "
              f"{' '.join(f'{v:.2f}' for v in row['shares'].values())} | {row['peak_rss_mb']} | {row['rss_vs_one_camera']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
