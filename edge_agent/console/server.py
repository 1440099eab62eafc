"""Starting the console: the listen address and its rule, the broker connection, uvicorn.

The rule: loopback by default; a non-loopback ``--listen`` needs a token (``--token-file`` or
``EDGE_AGENT_CONSOLE_TOKEN``), else the console refuses to start (one line, exit 2).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TextIO, Tuple

from edge_agent.console.settings import Settings
from edge_agent.errors import EdgeAgentError
from edge_agent.fleet.client import FleetClient

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8080"
TOKEN_ENV = "EDGE_AGENT_CONSOLE_TOKEN"
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name: where it resolves is not ours to promise
            return False

    def url(self, port: Optional[int] = None) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port if port is None else port}/"


def parse_listen(text: str) -> Listen:
    """``HOST:PORT`` (``[v6]:PORT``); port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise EdgeAgentError(f"--listen {text!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return Listen(host.strip("[]"), int(port))


def read_token(path: Optional[str], env_value: Optional[str]) -> Optional[str]:
    """The configured token: the file's first line, else the environment's; at least 16 characters."""
    token = None
    if path:
        try:
            lines = Path(path).read_text(encoding="utf-8").strip().splitlines()
        except OSError as exc:
            raise EdgeAgentError(f"--token-file {path}: cannot read ({exc.strerror})") from None
        token, what = (lines[0].strip() if lines else ""), f"--token-file {path}"
    elif env_value is not None:
        token, what = env_value.strip(), TOKEN_ENV
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise EdgeAgentError(f"{what}: the token must have at least {MIN_TOKEN_CHARS} characters")
    return token


def check_listen(listen: Listen, token: Optional[str]) -> None:
    if not listen.loopback and not token:
        raise EdgeAgentError(f"--listen {listen.host}:{listen.port} is not loopback: configure a token "
                             f"(--token-file FILE or {TOKEN_ENV}) or listen on 127.0.0.1")


def bind(listen: Listen) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((listen.host, listen.port))
    except OSError as exc:
        sock.close()
        raise EdgeAgentError(f"--listen {listen.host}:{listen.port}: cannot listen ({exc.strerror})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(mqtt: Any, listen: Listen, token: Optional[str], discover_s: float = 1.0,
          settings: Optional[Settings] = None, sign_key: Any = None, out: Optional[TextIO] = None) -> int:
    """Connect to the broker, bind, and serve until SIGINT/SIGTERM (limits: ``settings``)."""
    settings = settings or Settings()
    try:
        import uvicorn

        from edge_agent.console.app import Access, Hub, create_app
    except ImportError as exc:
        raise EdgeAgentError(f"the console needs its extra ({exc.name} is missing): "
                             "pip install 'edge-agent[console]'") from None
    from edge_agent.console.jobs import Jobs
    from edge_agent.console.rollouts import Rollouts
    from edge_agent.console.state import FleetState

    check_listen(listen, token)
    sock = bind(listen)
    hub = Hub()
    client = FleetClient(mqtt)
    try:
        client.connect()
        state = FleetState(client, on_change=hub.notify, forget_after_s=settings.forget_after_s).start()
        jobs = Jobs(mqtt, on_change=lambda job_id: hub.notify("job", job_id), discover_s=discover_s,
                    sign_key=sign_key)
        rollouts = Rollouts(mqtt, settings.rollouts_dir, jobs, discover_s=discover_s, sign_key=sign_key)
        app = create_app(state, jobs, hub, Access.make(token, listen.loopback), settings=settings, rollouts=rollouts)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                timeout_graceful_shutdown=2)
        port = sock.getsockname()[1]
        print(f"edge-agent console: {listen.url(port)} (broker {mqtt.host}:{mqtt.port}, "
              f"prefix {mqtt.topic_prefix})", file=out or sys.stdout, flush=True)
        server = uvicorn.Server(config)
        handle_exit = server.handle_exit

        def on_signal(sig: int, frame: Any) -> None:  # SIGINT/SIGTERM: end the event streams too
            hub.close()
            handle_exit(sig, frame)
        server.handle_exit = on_signal  # type: ignore[method-assign]
        server.run(sockets=[sock])
    finally:
        client.close()
        sock.close()
    return 0


def listen_and_token(listen_text: str, token_file: Optional[str],
                     env_token: Optional[str]) -> Tuple[Listen, Optional[str]]:
    """The listen address and the configured token, with the listen rule applied."""
    listen = parse_listen(listen_text)
    token = read_token(token_file, env_token)
    check_listen(listen, token)
    return listen, token
