"""``edge-agent`` command line: one sub-command a module, registered here.

Every user error is an :class:`EdgeAgentError`: printed as one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import List, Optional

from . import __version__
from .errors import EdgeAgentError

# Modules that contribute sub-commands through ``add_parser(subparsers)``.
COMMAND_MODULES = (
    "edge_agent.segment_cmd",
    "edge_agent.inspect_model",
    "edge_agent.catalog",
    "edge_agent.agent",
    "edge_agent.config",
    "edge_agent.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="Edge-device agent for semantic segmentation (DeepLab on TFLite/LiteRT/Edge TPU).",
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def setup_logging(verbosity: int = 0, level: Optional[str] = None) -> None:
    if level is None:
        level = "DEBUG" if verbosity >= 2 else "INFO" if verbosity == 1 else "WARNING"
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if not os.environ.get("JOURNAL_STREAM")
        else "<%(levelno)s>%(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except EdgeAgentError as exc:
        print(f"edge-agent: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `edge-agent inspect M | head`
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
