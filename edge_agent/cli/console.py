"""``edge-agent console``: the live fleet console (web app; ``pip install 'edge-agent[console]'``)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from edge_agent.cli.remote import add_broker_arguments, mqtt_from_args
from edge_agent.console.server import DEFAULT_LISTEN, TOKEN_ENV, listen_and_token, serve
from edge_agent.console.settings import Settings
from edge_agent.errors import EdgeAgentError
from edge_agent.fleet.client import DISCOVERY_S


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "console", help="a live fleet console in the browser (fleet, device, benchmark, deploy)",
        description="Serve a web page showing every device under the topic prefix live, and run "
                    "remote benchmarks and deployments from it. Broker credentials stay here.")
    add_broker_arguments(p)
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"where to serve (default {DEFAULT_LISTEN}; a non-loopback address needs a token)")
    p.add_argument("--token-file", metavar="FILE",
                   help=f"file whose first line is the access token (or set {TOKEN_ENV}); "
                        "required off loopback, checked on every state-changing request")
    p.add_argument("--sign-key", metavar="FILE", help="ed25519 private key to sign deployed models with")
    limits = Settings()
    p.add_argument("--max-upload-mb", type=float, default=limits.max_upload_mb, metavar="MIB",
                   help=f"largest model file to deploy (default {limits.max_upload_mb:g}, the agents' "
                        "deploy.max_size_mb default); streamed to a temporary file, 413 beyond")
    p.add_argument("--max-event-streams", type=int, default=limits.max_event_streams, metavar="N",
                   help=f"open console pages (event streams) at once (default {limits.max_event_streams}); "
                        "503 beyond")
    p.add_argument("--forget-after-h", type=float, default=limits.forget_after_s / 3600, metavar="HOURS",
                   help=f"forget a device offline and silent this long (default {limits.forget_after_s / 3600:g}); "
                        "at once when its retained availability/info is cleared")
    p.add_argument("--read-only", action="store_true",
                   help="a viewer's console (for viewer broker credentials): shows the fleet, hides and "
                        "refuses benchmarks, deployments, rollbacks and rollouts (403)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="where rollouts keep their state files and models (default "
                        "$XDG_STATE_HOME/edge-agent/console, i.e. ~/.local/state/edge-agent/console)")
    p.add_argument("--discover-s", type=float, default=DISCOVERY_S,
                   help="seconds each command waits for retained device states (default 1)")
    p.set_defaults(func=cmd_console)


def cmd_console(args: argparse.Namespace) -> int:
    listen, token = listen_and_token(args.listen, args.token_file, os.environ.get(TOKEN_ENV))
    sign_key = None
    if args.sign_key:
        from edge_agent.models import signing

        sign_key = signing.load_private_key(args.sign_key)
    if args.max_upload_mb <= 0 or args.max_event_streams < 1 or args.forget_after_h <= 0:
        raise EdgeAgentError("--max-upload-mb, --max-event-streams and --forget-after-h must be positive")
    settings = Settings(max_upload_mb=args.max_upload_mb, max_event_streams=args.max_event_streams,
                        forget_after_s=args.forget_after_h * 3600, read_only=args.read_only,
                        state_dir=args.state_dir)
    return serve(mqtt_from_args(args), listen, token, discover_s=args.discover_s, settings=settings,
                 sign_key=sign_key)
