"""``edge-agent host ...``: the host-side model tools (PTQ, QAT, evaluate, ...) of ``tools/host``.

Installed as the ``edge_agent_host`` package with ``pip install 'edge-agent[host]'`` (also as the
``edge-agent-host`` script); from a checkout they run as ``python -m tools.host``. TensorFlow is
only imported when a host command runs, never by the device agent.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any, List

from edge_agent.errors import EdgeAgentError


def host_main() -> Any:
    """The host tools' ``main``: the installed package, else the checkout's ``tools.host``."""
    for name in ("edge_agent_host.__main__", "tools.host.__main__"):
        try:
            return importlib.import_module(name).main
        except ModuleNotFoundError as exc:
            if exc.name not in (name.rsplit(".", 1)[0], name, "tools"):
                raise EdgeAgentError(f"the host tools need {exc.name!r}: pip install 'edge-agent[host]'") from None
    raise EdgeAgentError("the host tools are not installed: pip install 'edge-agent[host]'")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("host", help="host-side model tools: build, ptq, qat, evaluate, edgetpu-check ...",
                              add_help=False, prefix_chars="\0")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="arguments of the host tools (try: host --help)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    argv: List[str] = list(args.argv)
    return int(host_main()(argv, prog="edge-agent host") or 0)
