"""``edge-agent`` command line: one module of this package per command group, registered here.

Every user error is an :class:`EdgeAgentError`: printed as one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import List, Optional

from edge_agent import __version__
from edge_agent.config import mask_url_secrets
from edge_agent.errors import ConfigError, EdgeAgentError

# Modules that contribute sub-commands through ``add_parser(subparsers)``.
# Domain modules never import argparse: each command's options and wiring live here.
COMMAND_MODULES = (
    "edge_agent.cli.segment",
    "edge_agent.cli.inspect",
    "edge_agent.cli.models",
    "edge_agent.cli.run",
    "edge_agent.cli.config",
    "edge_agent.cli.demo",
    "edge_agent.cli.service",
    "edge_agent.cli.remote",
    "edge_agent.cli.fleet",
    "edge_agent.cli.console",
    "edge_agent.cli.bench",
    "edge_agent.cli.host",
    "edge_agent.cli.homeassistant",
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


# journald reads a "<N>" syslog priority prefix on each stderr line.
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                    logging.CRITICAL: 2}


class MaskingFormatter(logging.Formatter):
    """Every log line (tracebacks included) with URL passwords masked: the last line of defence
    behind the sources' and errors' own masking (:func:`edge_agent.config.mask_url_secrets`)."""

    def format(self, record: logging.LogRecord) -> str:
        return mask_url_secrets(super().format(record))


class JournalFormatter(MaskingFormatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelno, 6)
        return f"<{priority}>{record.name}: {super().format(record)}"


def setup_logging(verbosity: int = 0, level: Optional[str] = None) -> None:
    if level is None:
        level = "DEBUG" if verbosity >= 2 else "INFO" if verbosity == 1 else "WARNING"
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):  # under systemd: journald adds time and unit
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(MaskingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except EdgeAgentError as exc:
        what = "config error" if isinstance(exc, ConfigError) else "error"
        for line in exc.errors if isinstance(exc, ConfigError) else [str(exc)]:
            print(f"edge-agent: {what}: {mask_url_secrets(line)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `edge-agent inspect M | head`
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
