#!/usr/bin/env python3
"""What the daemon's malloc settings cost per frame: CPU of the large per-frame buffers.

    .venv/bin/python bench/allocator.py [--size 1920x1080] [--rounds 6]

``edge-agent run`` fixes glibc's mmap threshold (``daemon/system.tune_allocator``) so a dropped
model's blocks are mapped and given back; a frame above that threshold would be a fresh mapping
with a page fault per 4 kB every time, so the pipeline raises it above the frame size
(``fit_mmap_threshold``). This measures the per-frame work whose buffers scale with the frame (a
JPEG decoded at 1/2, BGR->RGB, a mask resized back to the frame) in fresh processes, alternating
glibc's defaults, the threshold left at 1 MiB, and the fitted threshold; medians of the CPU time
per frame, and the ratios to the defaults (docs/performance.md, "Soak").
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

from perf import IMAGES, REPO

from edge_agent.system import MALLOC_ENV  # noqa: E402

CHILD = r"""
import statistics, sys, time
import cv2, numpy as np
from edge_agent import system
mode, image, w, h = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if mode != "defaults":
    system.tune_allocator()
if mode == "fitted":
    system.fit_mmap_threshold(w * h * 3)
jpeg = cv2.imencode(".jpg", cv2.resize(cv2.imread(image), (w, h)))[1]
mask = np.zeros((513, 513), np.uint8)
cpu = []
for _ in range(220):
    t = time.thread_time()
    frame = cv2.cvtColor(cv2.imdecode(jpeg, cv2.IMREAD_REDUCED_COLOR_2), cv2.COLOR_BGR2RGB)
    full = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    cpu.append(time.thread_time() - t)
    del frame, full
print(statistics.median(cpu[20:]) * 1e3)
"""

MODES = ("defaults", "1 MiB", "fitted")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1920x1080", help="frame size WxH")
    p.add_argument("--rounds", type=int, default=6, help="processes per setting, alternating")
    args = p.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))
    env_clean = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}  # glibc's defaults
    ms = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            out = subprocess.run([sys.executable, "-c", CHILD, mode, str(IMAGES / "cat_1080p.jpg"), str(w), str(h)],
                                 capture_output=True, text=True, check=True, cwd=REPO, env=env_clean).stdout
            ms[mode].append(float(out))
    base = statistics.median(ms["defaults"])
    print(f"per-frame CPU of the large buffers at {w}x{h} (JPEG at 1/2, BGR->RGB, mask to the frame), "
          f"median of {args.rounds} processes x 200 frames:")
    for mode in MODES:
        med = statistics.median(ms[mode])
        print(f"  {mode:9s} {med:6.2f} ms  x{med / base:.2f}  ({', '.join(f'{v:.2f}' for v in ms[mode])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
