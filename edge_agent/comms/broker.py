"""An MQTT broker on loopback for the demo, the benchmark scripts and the tests.

The agent itself never needs this module on a real device (it talks to the site's broker); it
exists so that a newcomer can run the whole pipeline in one command without installing or
configuring a broker.  Preference order:

1. ``mosquitto`` (the broker real deployments use) as a subprocess with a generated config;
2. ``amqtt`` (pure Python, MQTT 3.1.1 only) in-process on its own asyncio loop in a thread;
3. a clear ``BrokerNotAvailable`` error telling the user what to install.

Only loopback addresses are ever bound.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from edge_agent.errors import EdgeAgentError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_MOSQUITTO_FALLBACK_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


class BrokerNotAvailable(EdgeAgentError):
    """Neither mosquitto nor amqtt is available, or the broker would not start."""


def find_mosquitto() -> Optional[str]:
    """Path of the mosquitto binary; /usr/sbin is often not on a normal user's PATH."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in _MOSQUITTO_FALLBACK_PATHS:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def amqtt_available() -> bool:
    """True if the amqtt broker can be imported (it is an optional dev/demo dependency)."""
    try:
        import amqtt.broker  # noqa: F401
    except Exception:  # ImportError, or a broken install on an unsupported Python
        return False
    return True


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free right now (the OS picks it; tiny race until the broker binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    """Poll until something accepts TCP connections on host:port, or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class MosquittoBroker:
    """A mosquitto subprocess on ``host:port`` that can be stopped and started again on the same port.

    ``extra_conf`` lines are appended to the ``listener`` section (e.g. ``cafile``,
    ``password_file``); without ``password_file`` anonymous clients are allowed.
    """

    def __init__(
        self,
        port: Optional[int] = None,
        host: str = LOOPBACK,
        extra_conf: Iterable[str] = (),
        workdir: Optional[str] = None,
        binary: Optional[str] = None,
    ) -> None:
        self.binary = binary or find_mosquitto()
        if not self.binary:
            raise BrokerNotAvailable("mosquitto is not installed (apt install mosquitto)")
        self.host = host
        self.port = port or free_port(host)
        self.extra_conf = list(extra_conf)
        self._tmp: Optional[tempfile.TemporaryDirectory] = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="edge-agent-mosquitto-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.conf_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self._proc: Optional[subprocess.Popen] = None

    def config_text(self) -> str:
        """The generated mosquitto.conf: one loopback listener, no persistence."""
        lines = [
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # As root mosquitto would drop to user "mosquitto", which cannot read our temp files.
            lines.append("user root")
        lines.append(f"listener {self.port} {self.host}")
        if not any(line.split()[:1] == ["password_file"] for line in self.extra_conf):
            lines.append("allow_anonymous true")
        lines.extend(self.extra_conf)
        return "\n".join(lines) + "\n"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 10.0) -> "MosquittoBroker":
        """Start mosquitto and wait until the port accepts connections."""
        if self.running:
            return self
        self.conf_path.write_text(self.config_text())
        logfile = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf_path)],
                stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        finally:
            logfile.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerNotAvailable(
                    f"mosquitto exited with code {self._proc.returncode} on {self.host}:{self.port}: "
                    f"{self.log_tail()}")
            if wait_for_port(self.host, self.port, 0.2):
                log.debug("mosquitto listening on %s:%d (pid %d)", self.host, self.port, self._proc.pid)
                return self
        self.stop()
        raise BrokerNotAvailable(f"mosquitto did not listen on {self.host}:{self.port} within {timeout:.0f} s")

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate mosquitto (SIGTERM, then SIGKILL) and wait for it."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def restart(self) -> "MosquittoBroker":
        self.stop()
        return self.start()

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the broker's log, for error messages and failing tests."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:].strip()
        except OSError:
            return ""

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "MosquittoBroker":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AmqttBroker:
    """amqtt's broker on its own asyncio loop in a daemon thread (MQTT 3.1.1 only)."""

    def __init__(self, port: Optional[int] = None, host: str = LOOPBACK) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._broker: Any = None

    def _config(self) -> dict:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }

    def start(self, timeout: float = 10.0) -> "AmqttBroker":
        try:
            from amqtt.broker import Broker
        except Exception as err:
            raise BrokerNotAvailable(f"amqtt cannot be imported: {err}") from err
        started = threading.Event()
        failure: list = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._broker = Broker(self._config(), loop=loop)
                loop.run_until_complete(self._broker.start())
            except Exception as err:  # reported to start() below
                failure.append(err)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="amqtt-broker", daemon=True)
        self._thread.start()
        if not started.wait(timeout) or failure:
            reason = failure[0] if failure else "timeout"
            raise BrokerNotAvailable(f"amqtt broker did not start on {self.host}:{self.port}: {reason}")
        if not wait_for_port(self.host, self.port, timeout):
            self.stop()
            raise BrokerNotAvailable(f"amqtt broker did not listen on {self.host}:{self.port}")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        loop, thread, broker = self._loop, self._thread, self._broker
        self._loop = self._thread = self._broker = None
        if loop is None or thread is None:
            return
        if broker is not None and loop.is_running():
            future = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
            try:
                future.result(timeout)
            except Exception as err:  # shutting down anyway
                log.debug("amqtt shutdown: %s", err)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)

    close = stop

    def __enter__(self) -> "AmqttBroker":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class EmbeddedBroker:
    """A throw-away loopback broker: mosquitto if installed, else amqtt, else a clear error.

    >>> with EmbeddedBroker() as broker:
    ...     run_agent(mqtt_host=broker.host, mqtt_port=broker.port)
    """

    def __init__(self, prefer: str = "auto") -> None:
        if prefer not in ("auto", "mosquitto", "amqtt"):
            raise ValueError(f"prefer must be auto, mosquitto or amqtt, not {prefer!r}")
        self.prefer = prefer
        self.kind = ""
        self._impl: Any = None

    @property
    def host(self) -> str:
        return self._impl.host

    @property
    def port(self) -> int:
        return self._impl.port

    def start(self) -> "EmbeddedBroker":
        use_mosquitto = self.prefer in ("auto", "mosquitto") and find_mosquitto() is not None
        use_amqtt = self.prefer in ("auto", "amqtt") and not use_mosquitto and amqtt_available()
        if use_mosquitto:
            self._impl, self.kind = MosquittoBroker().start(), "mosquitto"
        elif use_amqtt:
            self._impl, self.kind = AmqttBroker().start(), "amqtt"
        else:
            wanted = {"auto": "mosquitto or amqtt", "mosquitto": "mosquitto", "amqtt": "amqtt"}[self.prefer]
            raise BrokerNotAvailable(
                f"no embedded MQTT broker: install {wanted} (apt install mosquitto, or "
                "pip install 'edge-agent[dev]' for amqtt) or set mqtt.host to your broker")
        log.info("embedded %s broker on %s:%d", self.kind, self.host, self.port)
        return self

    def stop(self) -> None:
        impl, self._impl = self._impl, None
        if impl is not None:
            impl.close()

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
