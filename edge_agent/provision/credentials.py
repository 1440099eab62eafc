"""``service install --mqtt-credentials FILE``: the device's broker identity from the file
``edge-agent fleet add DEVICE --out FILE`` wrote on the host, so provisioning is one command on
each side.

The file is an agent config fragment (``[agent] device_id``, ``[mqtt]`` host, port, prefix, user
name, client id, password). Installing it puts the password where the unit's ``LoadCredential=``
reads it (``/etc/credstore/edge-agent.mqtt_password``, root, 0600: it never lands in the config)
and sets the other keys in ``/etc/edge-agent/config.toml``, line by line, leaving every other
line and comment as it is. Standard library only (``systemd/install.sh`` runs this with the
system ``python3``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import tomllib

from edge_agent.errors import EdgeAgentError

# The keys a credentials file may set in the installed config (the password goes elsewhere).
KEYS = {"agent": ("device_id",),
        "mqtt": ("host", "port", "topic_prefix", "username", "client_id", "tls", "ca_file")}
MARK = "# from edge-agent fleet"


class CredentialsError(EdgeAgentError):
    """The credentials file is unreadable or incomplete."""


def read(path: str) -> Tuple[Dict[str, Dict[str, Any]], str]:
    """(settings per section, password) of a credentials file."""
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CredentialsError(f"--mqtt-credentials {path}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise CredentialsError(f"--mqtt-credentials {path}: not TOML ({exc})") from None
    mqtt = doc.get("mqtt") or {}
    password = mqtt.get("password")
    if not isinstance(password, str) or not password or not mqtt.get("username"):
        raise CredentialsError(f"--mqtt-credentials {path}: needs [mqtt] username and password "
                               "(as `edge-agent fleet add DEVICE --out FILE` writes them)")
    settings = {section: {k: doc.get(section, {})[k] for k in keys if k in doc.get(section, {})}
                for section, keys in KEYS.items()}
    # the file's password replaces any the config holds (mqtt.password wins over the credential)
    settings["mqtt"].update(password="", password_file="")
    return settings, password


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))


def _current(line: str, key: str) -> Any:
    try:
        return tomllib.loads(line.strip()).get(key)
    except tomllib.TOMLDecodeError:
        return None


def set_keys(text: str, settings: Dict[str, Dict[str, Any]]) -> str:
    """``text`` (TOML) with each ``section.key`` set: an existing ``key = ...`` line of the section
    is replaced, a missing key added under its section header, a missing section appended."""
    todo = {s: dict(v) for s, v in settings.items() if v}
    out: List[str] = []
    section, end = "", 0  # the current section, and where its last non-blank line ends in ``out``

    def flush(name: str, at: int) -> None:  # keys of ``name`` not met in it: added after its last line
        added = [f"{key} = {_value(value)}  {MARK}" for key, value in todo.pop(name, {}).items()]
        out[at:at] = added

    for line in text.splitlines():
        head = line.strip()
        if head.startswith("[") and head.endswith("]") and not head.startswith("[["):
            flush(section, end)
            section = head.strip("[] ")
            out.append(line)
            end = len(out)
            continue
        match = re.match(r"\s*([A-Za-z0-9_]+)\s*=", line)
        if match and match.group(1) in todo.get(section, {}):
            value = todo[section].pop(match.group(1))
            if _current(line, match.group(1)) != value:  # a line already right stays as it is
                line = f"{match.group(1)} = {_value(value)}  {MARK}"
        out.append(line)
        if head:
            end = len(out)
    flush(section, end)
    for name in [n for n, v in todo.items() if v]:
        out += ["", f"[{name}]"]
        flush(name, len(out))
    result = "\n".join(out) + "\n"
    parsed = tomllib.loads(result)  # what we wrote must read back as asked
    for name, values in settings.items():
        for key, value in values.items():
            if parsed.get(name, {}).get(key) != value:
                raise CredentialsError(f"cannot set {name}.{key} in the config (edit it by hand)")
    return result


def plan(path: str, config: Path, credential: Path) -> List[Tuple[str, Callable[[], None], bool]]:
    """(what, run, already done) for ``service install``: the password into the credential store,
    the identity into the config (which the install step before may only just have written)."""
    settings, password = read(path)
    device = settings["agent"].get("device_id") or settings["mqtt"].get("username")

    def write_password() -> None:
        credential.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(credential.parent, 0o700)
        tmp = credential.with_name(credential.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fd, 0o600)
            fh.write(password + "\n")
        os.replace(tmp, credential)

    def set_identity() -> None:
        text = config.read_text(encoding="utf-8")
        new = set_keys(text, settings)
        if new != text:
            tmp = config.with_name(config.name + ".tmp")
            tmp.write_text(new, encoding="utf-8")
            st = config.stat()
            os.chmod(tmp, st.st_mode & 0o777)
            try:
                os.chown(tmp, st.st_uid, st.st_gid)
            except PermissionError:
                pass
            os.replace(tmp, config)

    try:
        password_done = credential.read_text(encoding="utf-8").rstrip("\r\n") == password
    except OSError:
        password_done = False
    try:
        text = config.read_text(encoding="utf-8")
        identity_done = set_keys(text, settings) == text
    except (OSError, CredentialsError):
        identity_done = False
    keys = ", ".join(f"{s}.{k}" for s, v in settings.items() for k in v if k not in ("password", "password_file"))
    return [(f"write {device}'s MQTT password to {credential} (mode 0600, from {path})", write_password,
             password_done),
            (f"set {keys} in {config} (from {path})", set_identity, identity_done)]
