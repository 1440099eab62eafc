"""``edge-agent service install|uninstall`` (the steps live in :mod:`edge_agent.provision.service`).

Only the standard library is imported, so systemd/install.sh runs it with the system ``python3``
from a checkout before any venv exists.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from edge_agent.provision import service
from edge_agent.errors import EdgeAgentError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix", default=service.DEFAULT_PREFIX,
                   help=f"where the venv lives (default {service.DEFAULT_PREFIX})")
    p.add_argument("--root", metavar="DIR",
                   help="install into a staging tree DIR instead of / (no user, no start)")
    p.add_argument("--dry-run", action="store_true", help="print every step, change nothing")


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Register ``service install|uninstall`` on the CLI's sub-command parser."""
    svc = subparsers.add_parser("service", help="install or remove the systemd service",
                                description="Install or remove edge-agent as a systemd service.")
    sub = svc.add_subparsers(dest="service_command", metavar="{install,uninstall}")
    sub.required = True
    inst = sub.add_parser("install", help="create user, venv, config; install and enable the unit")
    _common(inst)
    inst.add_argument("--package", default=service.default_package(),
                      help="what pip installs into the venv (default: this checkout, else "
                           "edge-agent from the index)")
    inst.add_argument("--no-package", action="store_true",
                      help="create the venv only (offline staging, tests)")
    inst.add_argument("--python", default=service.default_python(), help="interpreter for the venv")
    site = inst.add_mutually_exclusive_group()
    site.add_argument("--system-site-packages", dest="system_site_packages",
                      action="store_true", default=service.has_system_picamera2(),
                      help="let the venv see apt's python3-picamera2 (default: on if installed)")
    site.add_argument("--no-system-site-packages", dest="system_site_packages",
                      action="store_false")
    inst.add_argument("--mqtt-credentials", metavar="FILE",
                      help="the broker identity `edge-agent fleet add DEVICE --out FILE` wrote: the password "
                           f"to {service.CREDENTIAL_FILE} (0600), device id, broker, user and client id "
                           "into the config")
    inst.add_argument("--config-example", metavar="FILE",
                      help="config to copy to /etc/edge-agent/config.toml if absent")
    inst.add_argument("--unit-template", default=str(service.UNIT_TEMPLATE), help=argparse.SUPPRESS)
    inst.add_argument("--no-enable", action="store_true", help="install but do not enable")
    inst.add_argument("--no-start", action="store_true", help="enable but do not start now")
    inst.set_defaults(func=service.install)
    uni = sub.add_parser("uninstall", help="disable and remove the unit and the venv")
    _common(uni)
    uni.add_argument("--purge", action="store_true",
                     help="also remove /etc/edge-agent, /var/lib/edge-agent, the MQTT password in "
                          "/etc/credstore and the user")
    uni.set_defaults(func=service.uninstall)
    return svc


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Standalone entry (``python3 -m edge_agent.cli.service``) for systemd/install.sh: stdlib only."""
    parser = argparse.ArgumentParser(prog="edge-agent")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["service", *(argv if argv is not None else sys.argv[1:])])
    try:
        return args.func(args)
    except EdgeAgentError as err:
        print(f"edge-agent: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
