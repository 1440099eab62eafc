"""``edge-agent config check|show`` and the ``--config``/``--set`` options shared with ``run``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from edge_agent.config import Config, Problems, load_config, to_json, to_toml


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config and --set, shared by ``config check/show`` and ``run``."""
    parser.add_argument("--config", "-c", metavar="FILE", default=os.environ.get("EDGE_AGENT_CONFIG"),
                        help="TOML config file (default: $EDGE_AGENT_CONFIG, else built-in defaults)")
    parser.add_argument("--set", dest="overrides", metavar="SECTION.KEY=VALUE", action="append",
                        default=[], help="override one key; repeatable; wins over the file and env")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None), getattr(args, "overrides", None) or ())


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``edge-agent config check|show``."""
    parser = subparsers.add_parser("config", help="check or show the effective configuration")
    sub = parser.add_subparsers(dest="config_command", metavar="{check,show}")
    sub.required = True
    check = sub.add_parser("check", help="validate the config as `run` would at start; every problem at once, exit 2")
    add_config_arguments(check)
    check.add_argument("--no-model", action="store_true",
                       help="only check that the model file is found, without loading it")
    check.set_defaults(func=_cmd_check)
    show = sub.add_parser("show", help="print the effective config (secrets masked)")
    add_config_arguments(show)
    show.add_argument("--format", choices=("toml", "json"), default="toml")
    show.set_defaults(func=_cmd_show)
    return parser


def _cmd_check(args: argparse.Namespace) -> int:
    """Every problem ``run`` would meet at start, all at once (one line each, exit 2), else OK."""
    from edge_agent.daemon import preflight  # late: loads the model runtime and the sources

    found = Problems()
    cfg = load_config(args.config, args.overrides or (), problems=found)
    # A section with a bad key is not checked further: its defaults would add false problems.
    bad = {line.split(".", 1)[0].split(":", 1)[0] for line in found.lines}
    for line in preflight.problems(cfg, load_model=not args.no_model, skip=bad):
        found.add(line)
    found.raise_if_any()  # one ConfigError: every problem, one line each, exit 2
    origin = args.config or "built-in defaults"
    sources = (f"cameras {', '.join(f'{c.id} ({c.kind})' for c in cfg.cameras)}" if cfg.cameras
               else f"source {cfg.source.kind}")
    print(f"config OK ({origin}): device {cfg.agent.device_id}, {sources}, "
          f"mqtt {cfg.mqtt.host}:{cfg.mqtt.port}" + ("" if cfg.mqtt.enabled else " (disabled)"))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    sys.stdout.write(to_json(cfg) + "\n" if args.format == "json" else to_toml(cfg))
    return 0
