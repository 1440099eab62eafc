"""``edge-agent inspect MODEL``: tensors, dtypes, shapes, quantization and ops of a .tflite."""

from __future__ import annotations

import json

from edge_agent.cli.segment import add_model_args, add_runtime_option, model_options
from edge_agent.inference.inspect import describe, format_report
from edge_agent.models import catalog


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="print a model's tensors, dtypes, shapes, quantization, ops")
    p.add_argument("model", help="a .tflite path or a manifest model name")
    add_runtime_option(p)
    p.add_argument("--all", action="store_true", help="list every tensor, not just inputs/outputs")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--labels", help="label file (default: the model's own, from its metadata)")
    add_model_args(p)
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    resolved = catalog.resolve(args.model)  # a manifest name brings its labels, as for segment
    info = describe(resolved.path, args.runtime, model_options(args), args.labels or resolved.labels)
    print(json.dumps(info, indent=2) if args.json else format_report(info, args.all))
    return 0
