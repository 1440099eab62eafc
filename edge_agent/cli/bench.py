"""``edge-agent bench``: benchmark a model like TFLite's ``benchmark_model`` (library: daemon.benchmark)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Tuple

from edge_agent.cli.segment import add_runtime_args, make_segmenter
from edge_agent.output.benchmark import (BenchSettings, format_text, load_inputs, parse_frame_size,
                                         run_benchmark)
from edge_agent.errors import EdgeAgentError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmark a model like TFLite's benchmark_model",
                              description="Benchmark a model (invoke only, or the whole per-frame "
                                          "pipeline with --pipeline) and print latency statistics.")
    add_runtime_args(p)
    p.add_argument("--warmup", type=int, default=1, help="warmup runs after the first inference (default 1)")
    p.add_argument("--runs", type=int, default=50, help="measured runs (at least; see --min-secs) (default 50)")
    p.add_argument("--min-secs", type=float, default=0.0, help="keep running at least this long (default 0)")
    p.add_argument("--max-secs", type=float, default=None, help="stop after this long even before --runs")
    p.add_argument("--input", default="random", metavar="random|pattern|IMAGE|FOLDER",
                   help="input frames (default: random noise)")
    p.add_argument("--pipeline", action="store_true",
                   help="time every stage (preprocess, invoke, postprocess, encode) and end to end")
    p.add_argument("--frame-size", type=_frame_size_arg, default=None, metavar="WxH",
                   help="frame size for --pipeline / random input (default 640x480; images: own size)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="write the result as JSON to FILE (or stdout without FILE)")
    p.add_argument("--no-samples", action="store_true", help="leave per-run latencies out of the JSON")
    p.set_defaults(func=cmd_bench)
    return p


def _frame_size_arg(text: str) -> Tuple[int, int]:
    try:
        return parse_frame_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_bench(args: argparse.Namespace) -> int:
    settings = BenchSettings(runs=args.runs, warmup=args.warmup, min_secs=args.min_secs,
                             max_secs=args.max_secs, pipeline=args.pipeline,
                             frame_size=args.frame_size, input=args.input, samples=not args.no_samples)
    settings.check()
    frames = load_inputs(settings.input, settings.frame_size)  # a bad --input fails before the model loads
    t0 = time.perf_counter()
    segmenter = make_segmenter(args)
    init_ms = (time.perf_counter() - t0) * 1e3
    result = run_benchmark(segmenter, settings, init_ms=init_ms, frames=frames)
    if args.json is None:
        print(format_text(result))
        return 0
    text = json.dumps(result, indent=2)
    if args.json == "-":
        print(text)
    else:
        try:
            with open(args.json, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
        except OSError as exc:
            raise EdgeAgentError(f"{args.json}: cannot write ({exc.strerror})") from None
        print(format_text(result))
    return 0
