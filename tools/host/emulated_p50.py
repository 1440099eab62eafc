"""Invoke p50 of .tflite models with LiteRT alone (no TensorFlow, no project imports), for an
emulated aarch64 root: copy this file and the models into the root, then

    ROOT.run /venv/bin/python /w/emulated_p50.py --runs 5 --warmup 1 /w/models/*.tflite

Prints one line per model: median invoke (ms) of ``--runs`` interleaved rounds after ``--warmup``
(every round runs every model once), 1 thread, the input a constant mid-grey frame of the model's
own size, and the median per-round ratio to the first model. Under qemu-user emulation the times
are 40-60x a real Raspberry Pi's: only their ratios mean anything.
"""

import argparse
import os
import platform
import time

import numpy as np


def main() -> None:
    from ai_edge_litert.interpreter import Interpreter

    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    print(f"# {platform.machine()} python {platform.python_version()} "
          f"QEMU_CPU={os.environ.get('QEMU_CPU', '')} threads {args.threads}")
    its, frames = [], []
    for path in args.models:
        it = Interpreter(model_path=path, num_threads=args.threads)
        it.allocate_tensors()
        inp = it.get_input_details()[0]
        frames.append(np.full(inp["shape"], 128, inp["dtype"]) if inp["dtype"] != np.float32
                      else np.zeros(inp["shape"], np.float32))
        its.append(it)
    # interleaved: every round runs every model once (alternating order), so a change of load
    # hits all alike; ratio = median over rounds of the time / the first model's in that round
    times = [[] for _ in its]
    for r in range(args.warmup + args.runs):
        order = range(len(its)) if r % 2 == 0 else reversed(range(len(its)))
        for i in order:
            it = its[i]
            it.set_tensor(it.get_input_details()[0]["index"], frames[i])
            t0 = time.perf_counter()
            it.invoke()
            if r >= args.warmup:
                times[i].append(1000 * (time.perf_counter() - t0))
    for path, t in zip(args.models, times):
        ratio = np.median(np.array(t) / np.array(times[0]))
        print(f"{os.path.basename(path)}\t{np.median(t):.0f} ms\tratio to first {ratio:.2f}\t"
              f"(min {min(t):.0f}, max {max(t):.0f}, {args.runs} rounds)", flush=True)

if __name__ == "__main__":
    main()
