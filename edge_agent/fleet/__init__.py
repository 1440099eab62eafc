"""Host-side tools that talk to devices through the broker (``edge-agent remote ...``).

:mod:`edge_agent.fleet.client` is the generic part (connect, discover devices, send a command to
one device or the fleet, collect one final answer per device with a timeout); command modules
such as :mod:`edge_agent.fleet.bench` add a sub-command under ``edge-agent remote`` through
:func:`remote_commands`, so several modules can share the ``remote`` command.
"""

from __future__ import annotations

from typing import Any

_ATTR = "_edge_agent_remote_subparsers"


def remote_commands(subparsers: Any) -> Any:
    """The sub-parsers of ``edge-agent remote``, created by the first module that asks.

    ``p = remote_commands(subparsers).add_parser("deploy", ...)`` in any module's
    ``add_parser(subparsers)``; argparse refuses a second ``remote`` parser, so it is shared.
    """
    existing = getattr(subparsers, _ATTR, None)
    if existing is None:
        parser = subparsers.add_parser("remote", help="benchmark (and manage) devices over MQTT",
                                       description="Commands sent to devices through the MQTT broker.")
        existing = parser.add_subparsers(dest="remote_command", metavar="COMMAND", required=True)
        setattr(subparsers, _ATTR, existing)
    return existing
