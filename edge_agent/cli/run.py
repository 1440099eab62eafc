"""``edge-agent run``: the daemon (camera -> segmentation -> MQTT), usually under systemd."""

from __future__ import annotations

import argparse
import logging

from edge_agent import __version__
from edge_agent.cli.config import add_config_arguments, config_from_args
from edge_agent import system
from edge_agent.daemon.agent import Agent
from edge_agent.remote import HANDLERS

log = logging.getLogger("edge_agent.daemon.agent")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("run", help="run the agent daemon (camera -> segmentation -> MQTT)")
    add_config_arguments(p)
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if not args.verbose:
        logging.getLogger().setLevel(config.agent.log_level.upper())
    allocator = system.tune_allocator()  # before any thread starts: the arena limit is per new arena
    agent = Agent(config, handlers=HANDLERS, config_path=args.config, config_overrides=args.overrides)
    log.info("edge-agent %s starting as device '%s'%s", __version__, config.agent.device_id,
             f" (allocator: {allocator})" if allocator else "")
    return agent.run()
