"""``edge-agent config check|show`` and the ``--config``/``--set`` options shared with ``run``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from edge_agent.config import Config, load_config, to_json, to_toml


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
    check = sub.add_parser("check", help="validate the config; exit 0 if usable")
    add_config_arguments(check)
    check.set_defaults(func=_cmd_check)
    show = sub.add_parser("show", help="print the effective config (secrets masked)")
    add_config_arguments(show)
    show.add_argument("--format", choices=("toml", "json"), default="toml")
    show.set_defaults(func=_cmd_show)
    return parser


def _cmd_check(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # a ConfigError is printed by the CLI as one line, exit 2
    if cfg.mqtt.enabled and cfg.mqtt.tls:
        from edge_agent.comms.mqtt import tls_context

        tls_context(cfg.mqtt)  # loads the CA and the cert/key pair as ``run`` will (ConfigError if unusable)
    origin = args.config or "built-in defaults"
    print(f"config OK ({origin}): device {cfg.agent.device_id}, source {cfg.source.kind}, "
          f"mqtt {cfg.mqtt.host}:{cfg.mqtt.port}" + ("" if cfg.mqtt.enabled else " (disabled)"))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    sys.stdout.write(to_json(cfg) + "\n" if args.format == "json" else to_toml(cfg))
    return 0
