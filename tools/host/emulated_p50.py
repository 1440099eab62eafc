"""Invoke p50 of .tflite models with LiteRT alone (no TensorFlow, no project imports), for an
emulated aarch64 root: copy this file and the models into the root, then

    ROOT.run /venv/bin/python /w/emulated_p50.py --runs 5 --warmup 1 /w/models/*.tflite

Prints one line per model: median invoke (ms) of ``--runs`` runs after ``--warmup``, 1 thread,
the input a constant mid-grey frame of the model's own size. Under qemu-user emulation the times
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
    for path in args.models:
        it = Interpreter(model_path=path, num_threads=args.threads)
        it.allocate_tensors()
        inp = it.get_input_details()[0]
        frame = np.full(inp["shape"], 128, inp["dtype"]) if inp["dtype"] != np.float32 else \
            np.zeros(inp["shape"], np.float32)
        times = []
        for i in range(args.warmup + args.runs):
            it.set_tensor(inp["index"], frame)
            t0 = time.perf_counter()
            it.invoke()
            if i >= args.warmup:
                times.append(1000 * (time.perf_counter() - t0))
        print(f"{os.path.basename(path)}\t{np.median(times):.0f} ms\t(min {min(times):.0f}, "
              f"max {max(times):.0f}, {args.runs} runs)", flush=True)


if __name__ == "__main__":
    main()
