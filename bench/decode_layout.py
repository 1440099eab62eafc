#!/usr/bin/env python3
"""Issue 26 items 3 and 4: the JPEG decode budget and the automatic interpreter layout, measured.

    .venv/bin/python bench/decode_layout.py                      # ~6 min: micro + agent, 3 rounds
    .venv/bin/python bench/decode_layout.py --rounds 2 --window 6 --sources jpeg-1080p

* micro: CPU ms (``time.thread_time``) per 1080p / 720p frame of the bench's JPEGs (16:9 crops of
  the photos, quality 90): OpenCV at 1/2 (the agent before), simplejpeg at 1/2 (the agent now),
  simplejpeg at the smallest n/8 scale >= the model's letterbox region (3/8 = 720x405 of 1080p),
  each alone and followed by the letterbox into the 513x513 input; full-size decodes for scale.
* agent: the real daemon (``python -m edge_agent run``, mosquitto, a subscriber) on the JPEG
  folders, interleaved per round: the old decode (OpenCV: simplejpeg hidden by a
  ``sitecustomize`` shim) and the new one, both with 2x1 (interpreters x threads), then the new
  decode with the out-of-the-box config (``interpreters = 0, threads = 0``: automatic) and with
  the previous default (1 interpreter on all cores). Ratio = masks/s x ``invoke()`` alone on all
  cores, measured before and after each run (the same measure as bench/perf.py's throughput);
  CPU ratio = ``invoke()``'s process CPU alone over the agent's CPU per mask, which a loaded
  machine disturbs far less than wall time.

Ratios in one run only; nothing here is a timed test. Prints Markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.perf import (  # noqa: E402  (the same harness as bench/perf.py)
    LABELS, MODEL_FILES, PHOTOS, IMAGES, Subscriber, agent_bench, broker_pid, crop_16_9, log, make_sources,
    median, read_rgb, run_agent_once, standalone_invoke_cpu, write_agent_config,
)

SHIM = "import edge_agent.sources.images as _images\n_images.simplejpeg = None\n_images.JPEG_DECODER = 'opencv'\n"


def jpegs(height: int) -> List[Any]:
    import cv2

    out = []
    for name in PHOTOS:
        img = crop_16_9(read_rgb(IMAGES / name))
        img = cv2.resize(img, (height * 16 // 9, height), interpolation=cv2.INTER_AREA if img.shape[0] > height
                         else cv2.INTER_CUBIC)
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        out.append(buf.reshape(-1))
    return out


def measure_micro(rounds: int = 25) -> List[Dict[str, Any]]:
    import cv2
    import numpy as np

    from edge_agent.inference import preprocess as pp

    try:
        import simplejpeg
    except ImportError:
        simplejpeg = None
    rows = []
    for height in (1080, 720):
        data = jpegs(height)
        h, w = height, height * 16 // 9
        g = pp.make_geometry(h, w, 513, 513, "letterbox")
        canvas = np.zeros((513, 513, 3), np.uint8)
        ways = {
            "opencv full": lambda d: cv2.imdecode(d, cv2.IMREAD_COLOR_RGB),
            "opencv 1/2 (before)": lambda d: cv2.imdecode(d, cv2.IMREAD_REDUCED_GRAYSCALE_2 | cv2.IMREAD_COLOR_RGB),
        }
        if simplejpeg is not None:
            ways.update({
                "simplejpeg full": lambda d: simplejpeg.decode_jpeg(d, colorspace="RGB"),
                "simplejpeg 1/2 (now)": lambda d: simplejpeg.decode_jpeg(
                    d, colorspace="RGB", min_height=-(-h // 2), min_width=-(-w // 2)),
                "simplejpeg smallest n/8 >= letterbox": lambda d: simplejpeg.decode_jpeg(
                    d, colorspace="RGB", min_height=g.scaled_h, min_width=g.scaled_w),
            })
        cpu: Dict[str, List[float]] = {}
        shapes = {}
        for _ in range(rounds):
            for name, fn in ways.items():
                for with_lb in (False, True):
                    t0 = time.thread_time()
                    for d in data:
                        img = fn(d)
                        if with_lb:
                            pp.resize_into(img, canvas, g, 0)
                    cpu.setdefault((name, with_lb), []).append((time.thread_time() - t0) * 1e3 / len(data))
                    shapes[name] = img.shape[:2]
        for name in ways:
            rows.append({"frame": f"{w}x{h}", "decode": name, "decoded": f"{shapes[name][1]}x{shapes[name][0]}",
                         "decode_ms": round(median(cpu[(name, False)]), 2),
                         "decode_letterbox_ms": round(median(cpu[(name, True)]), 2)})
    return rows


CONFIGS = [  # (label, decoder, interpreters, threads); 0 = automatic
    ("opencv decode, 2x1", "opencv", 2, 1),
    ("simplejpeg decode, 2x1", "simplejpeg", 2, 1),
    ("defaults (automatic layout)", "simplejpeg", 0, 0),
    ("previous default 1xN", "simplejpeg", 1, 0),
]


def measure_agent(rounds: int, window_s: float, sources_wanted: List[str], model_name: str) -> List[Dict[str, Any]]:
    from edge_agent.config import load_config
    from edge_agent.inference import layout

    cores = os.cpu_count() or 1
    path = MODEL_FILES[model_name]
    runs: Dict[Any, List[Dict[str, Any]]] = {}
    with agent_bench("edge-agent-bench-dl-") as (tmp, broker), \
            contextlib.closing(Subscriber(broker.port, "edge-agent/bench/#")) as sub:
        shim = tmp / "shim"
        shim.mkdir()
        (shim / "sitecustomize.py").write_text(SHIM)
        sources = {k: v for k, v in make_sources(tmp).items() if k in sources_wanted}
        mosquitto_pid = broker_pid(broker)
        for r in range(rounds):
            for name, lines in sources.items():
                for label, decoder, interpreters, threads in CONFIGS:
                    cfg = write_agent_config(tmp / f"agent-{name}.toml", broker.port, tmp, path, threads,
                                             lines, interpreters=interpreters)
                    chosen = layout.for_config(load_config(str(cfg), env={}))
                    load = os.getloadavg()[0]
                    inv, cpu_a = standalone_invoke_cpu(path, cores, 8)
                    res = run_agent_once(broker.port, sub, cfg, window_s, warmup_s=2.0, broker_pid=mosquitto_pid,
                                         pythonpath=(str(shim),) if decoder == "opencv" else ())
                    inv_b, cpu_b = standalone_invoke_cpu(path, cores, 8)
                    invoke_ms = median(inv + inv_b)
                    ratio = round(res["fps"] * invoke_ms / 1e3, 3)
                    # load-robust proxy (bench/perf.py): invoke's CPU over the agent's CPU per mask
                    per_mask = res["agent_cpu_ms_per_mask"]
                    cpu_ratio = round((cpu_a + cpu_b) / 2 / per_mask, 3) if per_mask else None
                    log(f"  {name} {label} round {r}: {res['fps']:.2f} masks/s, invoke {invoke_ms:.2f} ms, "
                        f"ratio {ratio}, CPU ratio {cpu_ratio}, layout {chosen.interpreters}x{chosen.threads}, load {load:.2f}"
                        + (f", stderr {res['stderr_tail']}" if res["stderr_tail"] else ""))
                    runs.setdefault((name, label), []).append(
                        dict(ratio=ratio, cpu_ratio=cpu_ratio, fps=res["fps"], invoke_ms=invoke_ms, load=load,
                             layout=f"{chosen.interpreters}x{chosen.threads}", reason=chosen.reason,
                             rss=res["peak_rss_mb"]))
    rows = []
    for (name, label), rs in runs.items():
        rows.append({"source": name, "config": label, "layout": rs[-1]["layout"], "reason": rs[-1]["reason"],
                     "ratio": round(median([x["ratio"] for x in rs]), 3), "ratios": [x["ratio"] for x in rs],
                     "cpu_ratio": median([x["cpu_ratio"] for x in rs if x["cpu_ratio"]] or [0.0]),
                     "fps": round(median([x["fps"] for x in rs]), 2),
                     "invoke_ms": round(median([x["invoke_ms"] for x in rs]), 2),
                     "peak_rss_mb": median([x["rss"] for x in rs if x["rss"]]) if any(x["rss"] for x in rs) else None,
                     "load": [round(x["load"], 2) for x in rs]})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--window", type=float, default=8.0, help="seconds of masks counted per run")
    p.add_argument("--sources", default="jpeg-1080p,jpeg-720p")
    p.add_argument("--model", default="dm1.0", choices=sorted(MODEL_FILES))
    p.add_argument("--only", default="micro,agent")
    args = p.parse_args(argv)
    parts = args.only.split(",")
    print(f"# decode budget and layout ({os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, {args.model})\n")
    if "micro" in parts:
        log("micro: decode CPU per frame ...")
        print("| frame | decode | decoded | decode CPU ms | + letterbox ms |\n|---|---|---|---|---|")
        for row in measure_micro():
            print(f"| {row['frame']} | {row['decode']} | {row['decoded']} | {row['decode_ms']} | "
                  f"{row['decode_letterbox_ms']} |")
        print()
    if "agent" in parts:
        log("agent: subprocess + mosquitto ...")
        rows = measure_agent(args.rounds, args.window, args.sources.split(","), args.model)
        print("| source | config | layout | **ratio** (rounds) | CPU ratio | masks/s | invoke ms | peak RSS MB | load |\n"
              "|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['source']} | {row['config']} | {row['layout']} | **{row['ratio']}** "
                  f"({', '.join(str(x) for x in row['ratios'])}) | {row['cpu_ratio']} | {row['fps']} | {row['invoke_ms']} | "
                  f"{row['peak_rss_mb']} | {', '.join(str(x) for x in row['load'])} |")
        for row in rows:
            if row["config"].startswith("defaults"):
                print(f"\n{row['source']}, defaults: {row['layout']} because {row['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
