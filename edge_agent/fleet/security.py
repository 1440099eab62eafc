"""Per-device identity and least privilege at the broker: Mosquitto's dynamic security plugin.

``edge-agent fleet ...`` (:mod:`edge_agent.cli.fleet`) drives the plugin through its MQTT control
API (``$CONTROL/dynamic-security/v1``, JSON commands, answers on ``.../response``) with an admin
credential, over the product's one connection (:class:`~edge_agent.fleet.client.FleetClient`:
credentials, TLS, MQTT 5 with fallback): it works against a remote broker and needs no
``mosquitto_ctrl``.

Who may do what (``{prefix}`` is ``mqtt.topic_prefix``; dynsec ACLs have no ``%c``/``%u``
substitution, so every device gets its own role):

* a **device** ``ID`` (user name ``ID``, client id ``edge-agent-ID`` and no other): publishes only
  under ``{prefix}/ID/#``, subscribes only to ``{prefix}/ID/cmd/#`` and the fleet's
  ``{prefix}/all/cmd/#`` (with Home Assistant discovery: its own discovery configs and
  ``<discovery prefix>/status``);
* an **operator** (people, ``edge-agent remote ...``, the console): reads everything under
  ``{prefix}/#``, publishes commands on ``{prefix}/+/cmd/#`` (bench, deploy, rollback, presence);
* a **viewer** (Home Assistant, a read-only console, dashboards): reads ``{prefix}/#``, publishes
  nothing (with ``homeassistant``: also reads/writes the discovery prefix, as HA itself does).

Everything else is denied by the plugin's defaults (publish and subscribe denied, which ``init``
sets explicitly). Passwords are random (:func:`new_password`), returned to the caller once and
never logged.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import logging
import re
import secrets
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from edge_agent.config import FLEET_DEVICE, MqttConfig
from edge_agent.errors import EdgeAgentError
from edge_agent.fleet.client import FleetClient, FleetError

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = CONTROL_TOPIC + "/response"
PLUGIN_NAME = "mosquitto_dynamic_security.so"
DEFAULT_CONFIG_FILE = "/var/lib/mosquitto/dynamic-security.json"
ANSWER_TIMEOUT_S = 10.0
DEVICE_ID = re.compile(r"[A-Za-z0-9_-]+")  # as agent.device_id (one topic level)
USER_NAME = re.compile(r"[A-Za-z0-9_.@-]+")
DEVICE, OPERATOR, VIEWER = "device", "operator", "viewer"
KINDS = (DEVICE, OPERATOR, VIEWER)
# The plugin's own errors that mean "already as wanted" when (re)running init.
_EXISTS = ("already exists", "already in", "already has")


class SecurityError(EdgeAgentError):
    """The dynamic security plugin refused a command, or cannot be reached."""


def new_password() -> str:
    """A random password (32 URL-safe characters, 192 bits)."""
    return secrets.token_urlsafe(24)


def check_device_id(device_id: str) -> str:
    """A device id as ``agent.device_id`` accepts it: letters, digits, ``_``, ``-``; not ``all``."""
    if not DEVICE_ID.fullmatch(device_id or ""):
        raise SecurityError(f"device id {device_id!r}: letters, digits, '_' or '-' only (as agent.device_id)")
    if device_id.lower() == FLEET_DEVICE:
        raise SecurityError(f"device id {device_id!r} is reserved (the topic level of fleet-wide commands)")
    return device_id


def check_user_name(name: str) -> str:
    if not USER_NAME.fullmatch(name or ""):
        raise SecurityError(f"user name {name!r}: letters, digits, '_', '-', '.' or '@' only")
    return name


def find_plugin() -> Optional[str]:
    """The plugin's path on this host (Debian: the multiarch lib dir), None if not installed."""
    for pattern in (f"/usr/lib/*/{PLUGIN_NAME}", f"/usr/lib/{PLUGIN_NAME}", f"/usr/local/lib/{PLUGIN_NAME}",
                    f"/usr/lib/*/mosquitto/{PLUGIN_NAME}", f"/usr/local/lib/*/{PLUGIN_NAME}"):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def broker_config(plugin: Optional[str] = None, config_file: str = DEFAULT_CONFIG_FILE) -> str:
    """The lines mosquitto.conf needs to load the plugin (Mosquitto 2.0)."""
    return (f"# edge-agent fleet: per-device credentials and ACLs (Mosquitto dynamic security plugin)\n"
            f"plugin {plugin or find_plugin() or '/usr/lib/<multiarch>/' + PLUGIN_NAME}\n"
            f"plugin_opt_config_file {config_file}\n"
            "# Mosquitto 2 listens on localhost only until a listener is configured; if none is yet:\n"
            "#listener 1883\n"
            "#listener 8883 (with cafile/certfile/keyfile: passwords cross the network)\n")


_ADMIN_ACLS = [  # what `mosquitto_ctrl dynsec init` gives its admin: the control API, $SYS, reading
    {"acltype": "publishClientSend", "topic": "$CONTROL/dynamic-security/#", "allow": True},
    {"acltype": "publishClientReceive", "topic": "$CONTROL/dynamic-security/#", "allow": True},
    {"acltype": "subscribePattern", "topic": "$CONTROL/dynamic-security/#", "allow": True},
    {"acltype": "publishClientReceive", "topic": "$SYS/#", "allow": True},
    {"acltype": "subscribePattern", "topic": "$SYS/#", "allow": True},
    {"acltype": "publishClientReceive", "topic": "#", "allow": True},
    {"acltype": "subscribePattern", "topic": "#", "allow": True},
    {"acltype": "unsubscribePattern", "topic": "#", "allow": True},
]
PBKDF2_ITERATIONS = 101  # the plugin's own choice (mosquitto_ctrl dynsec init)


def password_hash(password: str, salt: Optional[bytes] = None,
                  iterations: int = PBKDF2_ITERATIONS) -> Dict[str, Any]:
    """The plugin's stored form of a password: PBKDF2-SHA512 over the salt's bytes, base64."""
    salt = salt if salt is not None else os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return {"password": base64.b64encode(digest).decode(), "salt": base64.b64encode(salt).decode(),
            "iterations": iterations}


def initial_config(admin: str, admin_password: str, prefix: str,
                   homeassistant: Optional[str] = None) -> Dict[str, Any]:
    """A complete plugin config file: the admin (as ``mosquitto_ctrl dynsec init`` makes it), the
    operator/viewer roles and the three groups of ``prefix``, publish/subscribe denied by default.
    Written by ``fleet init --dynsec-file`` so the broker starts with the fleet's roles in place."""
    n = Names(prefix)
    roles = [{"rolename": "admin", "acls": _ADMIN_ACLS},
             {"rolename": n.role(OPERATOR), "textname": f"edge-agent operators of {prefix}/",
              "acls": operator_acls(prefix)},
             {"rolename": n.role(VIEWER), "textname": f"edge-agent viewers of {prefix}/",
              "acls": viewer_acls(prefix, homeassistant)}]
    groups = [{"groupname": n.group(kind), "textname": f"edge-agent {kind}s of {prefix}/",
               "roles": [{"rolename": n.role(kind)}] if kind != DEVICE else []} for kind in KINDS]
    return {"clients": [{"username": check_user_name(admin), "textName": "edge-agent fleet admin",
                         **password_hash(admin_password), "roles": [{"rolename": "admin"}]}],
            "roles": roles, "groups": groups,
            "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": True,
                                 "subscribe": False, "unsubscribe": True}}


def write_secret(path: str, text: str, force: bool = False) -> None:
    """Create ``path`` with mode 0600 (never another mode, not even briefly); an existing file is
    refused unless ``force``."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise SecurityError(f"{path} exists: not overwritten (--force replaces it)") from None
    except OSError as exc:
        raise SecurityError(f"{path}: cannot write ({exc.strerror})") from None
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        os.fchmod(fd, 0o600)
        fh.write(text)


@dataclass(frozen=True)
class Names:
    """The plugin's role and group names for one topic prefix (several fleets may share a broker)."""

    prefix: str

    @property
    def ns(self) -> str:
        return re.sub(r"[^A-Za-z0-9_-]+", "-", self.prefix).strip("-") or "edge-agent"

    def role(self, kind: str) -> str:
        return f"{self.ns}-{kind}"

    def device_role(self, device_id: str) -> str:
        return f"{self.ns}-device-{device_id}"

    def group(self, kind: str) -> str:
        return f"{self.ns}-{kind}s"

    def kind_of(self, groups: Iterable[str]) -> Optional[str]:
        for kind in KINDS:
            if self.group(kind) in groups:
                return kind
        return None


def _acl(acltype: str, topic: str, allow: bool = True) -> Dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": allow}


def device_acls(prefix: str, device_id: str, homeassistant: Optional[str] = None) -> List[Dict[str, Any]]:
    """A device publishes under its own topics only and hears only its own and the fleet's commands."""
    base = f"{prefix}/{device_id}"
    acls = [_acl("publishClientSend", f"{base}/#"),
            _acl("subscribePattern", f"{base}/cmd/#"),
            _acl("subscribePattern", f"{prefix}/{FLEET_DEVICE}/cmd/#")]
    if homeassistant:  # the agent's discovery configs (node edge-agent-<id>) and HA's birth message
        node = f"{homeassistant}/+/edge-agent-{device_id}/+/config"
        acls += [_acl("publishClientSend", node), _acl("subscribePattern", node),
                 _acl("subscribePattern", f"{homeassistant}/status")]
    return acls


def operator_acls(prefix: str) -> List[Dict[str, Any]]:
    return [_acl("subscribePattern", f"{prefix}/#"), _acl("publishClientSend", f"{prefix}/+/cmd/#")]


def viewer_acls(prefix: str, homeassistant: Optional[str] = None) -> List[Dict[str, Any]]:
    acls = [_acl("subscribePattern", f"{prefix}/#")]
    if homeassistant:  # Home Assistant itself: discovery configs in, its birth/status message out
        acls += [_acl("subscribePattern", f"{homeassistant}/#"),
                 _acl("publishClientSend", f"{homeassistant}/status")]
    return acls


@dataclass
class Credential:
    """What a new or rotated client needs to connect: shown once, never logged."""

    kind: str
    username: str
    password: str
    client_id: str = ""  # devices only: the only client id the broker accepts for them
    device_id: str = ""

    def toml(self, mqtt: MqttConfig, host: Optional[str] = None, port: Optional[int] = None) -> str:
        """An agent config fragment: ``service install --mqtt-credentials FILE`` on the device, or
        ``--config FILE`` for ``remote``/``console`` on a host (operator, viewer)."""
        def q(value: str) -> str:
            return json.dumps(value)
        lines = [f"# edge-agent {self.kind} credentials for {self.username!r} (edge-agent fleet); keep secret",
                 ]
        if self.kind == DEVICE:
            lines += ["# on the device: sudo edge-agent service install --mqtt-credentials THIS_FILE",
                      "[agent]", f"device_id = {q(self.device_id)}", ""]
        elif self.kind == "admin":
            lines += ["# the dynamic security plugin's admin: edge-agent fleet COMMAND --config THIS_FILE", ""]
        else:
            lines += ["# on a host: edge-agent remote devices --config THIS_FILE", ""]
        lines += ["[mqtt]", f"host = {q(host or mqtt.host)}", f"port = {int(port or mqtt.port)}",
                  f"topic_prefix = {q(mqtt.topic_prefix)}", f"username = {q(self.username)}",
                  f"password = {q(self.password)}"]
        if self.client_id:
            lines.append(f"client_id = {q(self.client_id)}")
        if mqtt.tls:
            lines.append("tls = true")
            if mqtt.ca_file:
                lines.append(f"ca_file = {q(mqtt.ca_file)}  # the CA's path on the target machine")
        return "\n".join(lines) + "\n"


@dataclass
class Entry:
    """One client of the plugin, as ``fleet list`` shows it."""

    username: str
    kind: str  # device | operator | viewer | admin | other
    client_id: str
    disabled: bool
    roles: List[str]


class _AdminClient(FleetClient):
    """The fleet client (connect policy, SUBACK waits, re-subscribing) plus the plugin's answers,
    which lie outside the topic prefix the fleet client handles."""

    def __init__(self, mqtt: MqttConfig, on_response: Callable[[bytes], None]) -> None:
        super().__init__(mqtt, client_id=f"edge-agent-admin-{uuid.uuid4().hex[:8]}")
        self._on_response = on_response

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if msg.topic == RESPONSE_TOPIC:
            self._on_response(bytes(msg.payload))
            return
        super()._on_message(client, userdata, msg)


class Dynsec:
    """The plugin's control API over one admin connection: ``with Dynsec(mqtt) as ds: ds.add_device("pi-1")``.

    ``mqtt`` is the ``[mqtt]`` of the admin (user name and password of a client holding the
    plugin's ``admin`` role, as ``mosquitto_ctrl dynsec init`` creates it); its ``topic_prefix``
    is the fleet's.
    """

    def __init__(self, mqtt: MqttConfig, timeout: float = ANSWER_TIMEOUT_S) -> None:
        self.cfg = mqtt
        self.prefix = mqtt.topic_prefix
        self.names = Names(self.prefix)
        self.timeout = timeout
        self._client = _AdminClient(mqtt, self._on_response)
        self._cond = threading.Condition()
        self._answers: Dict[str, List[Dict[str, Any]]] = {}

    def __enter__(self) -> "Dynsec":
        self._client.connect()
        try:
            self._client.subscribe([RESPONSE_TOPIC])
        except FleetError:
            self.close()
            raise SecurityError(f"{self.cfg.username or 'anonymous'} may not subscribe to {RESPONSE_TOPIC}: "
                                "use the plugin's admin credential") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def _on_response(self, payload: bytes) -> None:
        try:
            doc = json.loads(payload)
            responses = doc["responses"]
        except (ValueError, KeyError, TypeError):
            return
        if not isinstance(responses, list) or not responses:
            return
        tag = responses[0].get("correlationData") if isinstance(responses[0], dict) else None
        if isinstance(tag, str):
            with self._cond:
                self._answers[tag] = responses
                self._cond.notify_all()

    def run(self, commands: Sequence[Dict[str, Any]], tolerate: Sequence[str] = ()) -> List[Dict[str, Any]]:
        """Send ``commands`` in one message; their responses in order. SecurityError naming the
        first command the plugin refused, unless its error contains one of ``tolerate``."""
        tag = uuid.uuid4().hex
        batch = [dict(c, correlationData=f"{tag}-{i}") for i, c in enumerate(commands)]
        self._client.publish(CONTROL_TOPIC, json.dumps({"commands": batch}).encode())
        with self._cond:
            if not self._cond.wait_for(lambda: f"{tag}-0" in self._answers, self.timeout):
                raise SecurityError(
                    f"no answer on {RESPONSE_TOPIC} within {self.timeout:g} s from {self._client.cfg.host}:"
                    f"{self._client.cfg.port}: is the dynamic security plugin loaded (`edge-agent fleet "
                    f"init` prints the mosquitto.conf lines) and is {self.cfg.username or 'anonymous'!r} "
                    "its admin (mqtt.username/--username, --password-file)?")
            responses = self._answers.pop(f"{tag}-0")
        for command, response in zip(commands, responses):
            error = response.get("error")
            if error and not any(t in error.lower() for t in tolerate):
                what = command.get("username") or command.get("rolename") or command.get("groupname") or ""
                raise SecurityError(f"{command['command']} {what}: {error}".replace("  ", " "))
        return responses

    # -- the fleet --------------------------------------------------------------------------------
    def init(self, homeassistant: Optional[str] = None) -> List[str]:
        """Create (or complete) the shared roles and groups; deny by default. Idempotent.
        Returns what was done, one line each."""
        n = self.names
        commands: List[Dict[str, Any]] = [
            {"command": "setDefaultACLAccess", "acls": [{"acltype": "publishClientSend", "allow": False},
                                                        {"acltype": "subscribe", "allow": False}]}]
        roles = {OPERATOR: operator_acls(self.prefix), VIEWER: viewer_acls(self.prefix, homeassistant)}
        for kind, acls in roles.items():
            commands.append({"command": "createRole", "rolename": n.role(kind),
                             "textname": f"edge-agent {kind}s of {self.prefix}/"})
            commands += [{"command": "addRoleACL", "rolename": n.role(kind), **acl} for acl in acls]
        for kind in KINDS:
            commands.append({"command": "createGroup", "groupname": n.group(kind),
                             "textname": f"edge-agent {kind}s of {self.prefix}/"})
        for kind in roles:
            commands.append({"command": "addGroupRole", "groupname": n.group(kind), "rolename": n.role(kind)})
        self.run(commands, tolerate=_EXISTS)
        return [f"roles {n.role(OPERATOR)}, {n.role(VIEWER)} (one role per device: {n.device_role('ID')})",
                f"groups {', '.join(n.group(k) for k in KINDS)}",
                "default access: publish and subscribe denied unless a role allows them"]

    def add_device(self, device_id: str, homeassistant: Optional[str] = None,
                   client_id: Optional[str] = None) -> Credential:
        """A device client ``device_id`` with its own role; its new random password (shown once)."""
        check_device_id(device_id)
        n = self.names
        self._refuse_existing(device_id)
        password = new_password()
        client_id = client_id or f"edge-agent-{device_id}"
        role = n.device_role(device_id)
        self.run([{"command": "createRole", "rolename": role, "textname": f"edge-agent device {device_id}",
                   "acls": device_acls(self.prefix, device_id, homeassistant)}], tolerate=("already exists",))
        self.run([{"command": "createClient", "username": device_id, "password": password,
                   "clientid": client_id, "textname": f"edge-agent device {device_id}",
                   "roles": [{"rolename": role}], "groups": [{"groupname": n.group(DEVICE)}]}])
        log.info("fleet: device %s added (client id %s, role %s)", device_id, client_id, role)
        return Credential(DEVICE, device_id, password, client_id, device_id)

    def add_user(self, name: str, kind: str) -> Credential:
        """An operator or viewer (people, tools); any client id (tools use random ones)."""
        if kind not in (OPERATOR, VIEWER):
            raise ValueError(kind)
        check_user_name(name)
        self._refuse_existing(name)
        password = new_password()
        self.run([{"command": "createClient", "username": name, "password": password,
                   "textname": f"edge-agent {kind}", "groups": [{"groupname": self.names.group(kind)}]}])
        log.info("fleet: %s %s added", kind, name)
        return Credential(kind, name, password)

    def _refuse_existing(self, name: str) -> None:
        got = self.run([{"command": "getClient", "username": name}], tolerate=("not found",))
        if not got[0].get("error"):
            raise SecurityError(f"{name!r} exists already: `edge-agent fleet rotate {name}` gives it a new "
                                f"password, `edge-agent fleet revoke {name}` removes it")

    def _entry(self, name: str) -> Entry:
        got = self.run([{"command": "getClient", "username": name}], tolerate=("not found",))
        if got[0].get("error"):
            raise SecurityError(f"no client {name!r} on the broker (`edge-agent fleet list`)")
        return self._to_entry(got[0].get("data", {}).get("client", {}))

    def rotate(self, name: str) -> Credential:
        """A new random password; the broker disconnects the client, the old password is refused."""
        entry = self._entry(name)
        password = new_password()
        self.run([{"command": "setClientPassword", "username": name, "password": password}])
        log.info("fleet: password of %s rotated", name)
        return Credential(entry.kind if entry.kind in KINDS else "client", name, password,
                          entry.client_id, name if entry.kind == DEVICE else "")

    def revoke(self, name: str, disable_only: bool = False) -> str:
        """Delete the client (and a device's role), or only disable it; either way the broker
        disconnects it now and refuses it from then on."""
        entry = self._entry(name)
        if disable_only:
            self.run([{"command": "disableClient", "username": name}])
            return f"{name}: disabled (disconnected, refused until `edge-agent fleet enable {name}`)"
        commands: List[Dict[str, Any]] = [{"command": "deleteClient", "username": name}]
        role = self.names.device_role(name)
        if role in entry.roles:
            commands.append({"command": "deleteRole", "rolename": role})
        self.run(commands)
        log.info("fleet: %s revoked", name)
        return f"{name}: deleted (disconnected, refused from now on)"

    def enable(self, name: str) -> str:
        self._entry(name)
        self.run([{"command": "enableClient", "username": name}])
        return f"{name}: enabled"

    def list(self) -> List[Entry]:
        got = self.run([{"command": "listClients", "verbose": True}])
        clients = got[0].get("data", {}).get("clients", [])
        return sorted((self._to_entry(c) for c in clients if isinstance(c, dict)),
                      key=lambda e: (KINDS.index(e.kind) if e.kind in KINDS else 9, e.username))

    def _to_entry(self, c: Dict[str, Any]) -> Entry:
        groups = [g.get("groupname", "") for g in c.get("groups", []) if isinstance(g, dict)]
        roles = [r.get("rolename", "") for r in c.get("roles", []) if isinstance(r, dict)]
        kind = self.names.kind_of(groups) or ("admin" if "admin" in roles else "other")
        return Entry(c.get("username", ""), kind, c.get("clientid", "") or "", bool(c.get("disabled")), roles)
