"""A REAL Home Assistant core for tests: installed in its own venv, started on a loopback port.

``tools/homeassistant-venv.sh`` installs Home Assistant (2025.4.4, Python 3.13) into a cached
venv. :class:`HomeAssistantServer` writes a throw-away config directory: ``configuration.yaml``
(http on 127.0.0.1:<free port>, the REST ``api``), the MQTT integration as a config entry pointed at
the test's mosquitto (``.storage/core.config_entries``, as HA's UI would create it) and an owner
with a long-lived access token (``.storage/auth``), then runs ``python -m homeassistant`` and talks
to it through its own REST API.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
INSTALLER = REPO / "tools" / "homeassistant-venv.sh"
DEFAULT_VENV = "/tmp/edge-agent-ha-venv"
NO_PYTHON_EXIT = 3  # the installer's "no Python 3.13 on this machine"


def ha_venv() -> Path:
    return Path(os.environ.get("EDGE_AGENT_HA_VENV", DEFAULT_VENV))


def install_home_assistant(venv: Path, timeout: float = 900) -> Tuple[int, str]:
    """Run the installer (a no-op when the venv already has the version); (exit code, output)."""
    proc = subprocess.run(["bash", str(INSTALLER), str(venv)], capture_output=True, text=True, timeout=timeout)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_jwt(claims: Dict[str, Any], key: str) -> str:
    """The JWT Home Assistant issues for a long-lived token (HS256 with the refresh token's key)."""
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    sig = hmac.new(key.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


class HomeAssistantServer:
    """Home Assistant core with MQTT (config entry) and the REST API, on 127.0.0.1:<port>."""

    def __init__(self, venv: Path, config_dir: Path, mqtt_host: str, mqtt_port: int) -> None:
        self.python = venv / "bin" / "python"
        self.config_dir = config_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None
        self.log = config_dir / "home-assistant.log"
        self.token = self._seed(mqtt_host, mqtt_port)
        self.start_seconds: Optional[float] = None

    # -- the config directory ---------------------------------------------------------------
    def _seed(self, mqtt_host: str, mqtt_port: int) -> str:
        storage = self.config_dir / ".storage"
        storage.mkdir(parents=True, exist_ok=True)
        (self.config_dir / "configuration.yaml").write_text(
            "homeassistant:\n"
            "  name: edge-agent test\n  latitude: 52.5\n  longitude: 13.4\n  elevation: 0\n"
            "  unit_system: metric\n  time_zone: UTC\n  currency: EUR\n  country: DE\n"
            f"  internal_url: {self.url}\n"
            f"http:\n  server_host: 127.0.0.1\n  server_port: {self.port}\n"
            "api:\n"
            "logger:\n  default: warning\n  logs:\n    homeassistant.components.mqtt: info\n")
        now = datetime.now(timezone.utc).isoformat()
        entry = {
            "entry_id": uuid.uuid4().hex, "domain": "mqtt", "title": mqtt_host, "version": 1,
            "minor_version": 2, "source": "user", "unique_id": None, "disabled_by": None,
            "data": {"broker": mqtt_host, "port": mqtt_port}, "options": {},
            "pref_disable_new_entities": False, "pref_disable_polling": False,
            "created_at": now, "modified_at": now, "discovery_keys": {}, "subentries": [],
        }
        self._write(storage / "core.config_entries", "core.config_entries", 1, 5, {"entries": [entry]})
        user_id, token_id, jwt_key = uuid.uuid4().hex, uuid.uuid4().hex, secrets.token_hex(64)
        auth = {
            "users": [{"id": user_id, "group_ids": ["system-admin"], "is_owner": True, "is_active": True,
                       "name": "edge-agent test", "system_generated": False, "local_only": False}],
            "groups": [{"id": "system-admin", "name": "Administrators"},
                       {"id": "system-users", "name": "Users"},
                       {"id": "system-read-only", "name": "Read Only"}],
            "credentials": [],
            "refresh_tokens": [{
                "id": token_id, "user_id": user_id, "client_id": None, "client_name": "edge-agent tests",
                "client_icon": None, "token_type": "long_lived_access_token", "created_at": now,
                "access_token_expiration": 86400.0 * 365, "token": secrets.token_hex(64), "jwt_key": jwt_key,
                "last_used_at": None, "last_used_ip": None, "expire_at": None, "credential_id": None,
                "version": None,
            }],
        }
        self._write(storage / "auth", "auth", 1, 1, auth)
        issued = int(time.time()) - 60
        return hs256_jwt({"iss": token_id, "iat": issued, "exp": issued + 86400 * 365}, jwt_key)

    @staticmethod
    def _write(path: Path, key: str, version: int, minor: int, data: Dict[str, Any]) -> None:
        path.write_text(json.dumps({"version": version, "minor_version": minor, "key": key, "data": data}))

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> "HomeAssistantServer":
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [str(self.python), "-m", "homeassistant", "--config", str(self.config_dir), "--skip-pip",
             "--log-file", str(self.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(self.config_dir))
        self.wait_for(lambda: self._api_up(), timeout, "the REST API to answer")
        self.start_seconds = time.monotonic() - t0
        return self

    def _api_up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"Home Assistant exited ({self.proc.returncode}):\n{self.log_tail()}")
        try:
            return self.get("/api/")[0] == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- REST API -------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None) -> Tuple[int, bytes, Dict[str, str]]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as err:
            return err.code, err.read(), dict(err.headers)

    def get(self, path: str) -> Tuple[int, bytes, Dict[str, str]]:
        return self.request("GET", path)

    def state(self, entity_id: str) -> Optional[Dict[str, Any]]:
        code, body, _ = self.get(f"/api/states/{entity_id}")
        return json.loads(body) if code == 200 else None

    def states(self) -> Dict[str, Dict[str, Any]]:
        code, body, _ = self.get("/api/states")
        assert code == 200, body
        return {s["entity_id"]: s for s in json.loads(body)}

    def template(self, text: str) -> str:
        code, body, _ = self.request("POST", "/api/template", {"template": text})
        assert code == 200, body
        return body.decode()

    def call(self, domain: str, service: str, data: Dict[str, Any]) -> None:
        code, body, _ = self.request("POST", f"/api/services/{domain}/{service}", data)
        assert code == 200, (code, body)

    def wait_for(self, condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
        """Poll ``condition`` until it returns something truthy; AssertionError with HA's log."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"Home Assistant: no {what} within {timeout:.0f} s\n{self.log_tail()}")
            time.sleep(interval)
