"""The agent's configuration: one TOML file, overridable by environment variables and ``--set``.

Why it looks like this:

* The schema is declarative: every key is ONE line in a section dataclass below,
  ``name: type = opt(default, Field)``.  The field (``edge_agent.schema``, shared with the MQTT
  commands) both validates TOML values and parses the strings that arrive through
  ``EDGE_AGENT_<SECTION>_<KEY>`` and ``--set section.key=value``, so adding a key never touches
  the loader.
* ``source.kind`` and ``model.runtime`` accept what the source and runtime registries know
  (built-in backends and installed plugins), looked up only when such a value is checked.
* Everything the user can get wrong is refused up front with a ``ConfigError`` naming the key
  path and the expected type (``mqtt.port: expected integer 1..65535, got 'abc'``): a daemon that
  starts with a typo'd key silently ignored is worse than one that does not start.
* Precedence: defaults < TOML file < environment < ``--set``.
* Secrets can come from files (``mqtt.password_file``, or systemd's ``LoadCredential=`` through
  ``$CREDENTIALS_DIRECTORY/mqtt_password``) so they never appear in the unit file or the process
  environment; ``config show`` masks them.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from edge_agent import registry_choices
from edge_agent.errors import ConfigError
from edge_agent.schema import Bool, Choice, Field, Float, Int, Invalid, Str, StrList

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on the device's older Pythons
    import tomli as tomllib

ENV_PREFIX = "EDGE_AGENT_"
MASK = "***"

# The password in a URL's userinfo (``rtsp://user:PASSWORD@host/...``): up to the LAST '@' of the
# authority, as URL parsers (and ffmpeg) read it, so a password holding a raw '@' is masked whole.
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s/?#@:'\"]*):[^\s/?#'\"]*@")


def mask_url_secrets(text: Any) -> Any:
    """``text`` with every URL password replaced by ``***`` (``rtsp://admin:***@cam/stream``).

    THE one helper for everything the agent publishes or logs that may hold a URL: source names,
    ``info``, ``config show``, stats' ``last_error``, error messages, log lines. Not a string:
    returned as is."""
    if not isinstance(text, str) or "@" not in text:
        return text
    return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}:{MASK}@", text)
CREDENTIAL_MQTT_PASSWORD = "mqtt_password"
CAMERAS = "cameras"  # the [[cameras]] array of tables
FLEET_DEVICE = "all"  # the topic level of fleet-wide commands: no device may have this id


# --------------------------------------------------------------------------- value specs


def _runtime_choices() -> List[str]:
    return registry_choices("model.runtime")  # looked up when checked: loading a config loads no backend


def _source_kinds() -> List[str]:
    return registry_choices("source.kind")  # backends import numpy and OpenCV: only when checked


def opt(default: Any, spec: Field, secret: bool = False) -> Any:
    """One schema line: the default, how to validate it, whether ``config show`` masks it."""
    return field(default=default, metadata={"spec": spec, "secret": secret})


BOOL = Bool()
STR = Str()
PATH = Str(expected="path")
POS_FLOAT = Float(lo=0.0)
NAME = Str(r"[A-Za-z0-9_-]*", "string of letters, digits, '_' or '-'")
# No leading '$': brokers reserve $-topics ($SYS) and refuse publishes there (PUBACK 0x87).
TOPIC_PREFIX = Str(r"[^#+/\x00$][^#+/\x00]*(/[^#+/\x00]+)*",
                   "MQTT topic without wildcards, a leading '$' or leading/trailing '/'")
REPLY_PREFIXES = StrList(Str(r"[^#+/\x00$][^#+/\x00]*(/[^#+/\x00]+)*",
                             "MQTT topics without wildcards, a leading '$' or leading/trailing '/'"))
EDGETPU = Str(r"|usb(:\d+)?|pci(:\d+)?|:\d+", "'' or usb, usb:N, pci, pci:N, :N")
QOS = Int(0, 2)
_NUM = r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"
NUMBERS = Str(rf"|{_NUM}|{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}", "'' or one number or three comma-separated (R, G, B)")


# --------------------------------------------------------------------------- the schema


@dataclass(frozen=True)
class AgentConfig:
    device_id: str = opt("", NAME)  # "" -> hostname, sanitised
    state_dir: str = opt("", PATH)  # "" -> $STATE_DIRECTORY or ~/.local/state/edge-agent
    log_level: str = opt("info", Choice("debug", "info", "warning", "error"))
    # Groups this device belongs to (published in info): `remote ... --group TAG`, staged rollouts.
    tags: Tuple[str, ...] = opt((), StrList(Str(r"[A-Za-z0-9_.-]{1,64}", "tag of 1-64 letters, digits, '_', '.' or '-'")))


@dataclass(frozen=True)
class SourceConfig:
    kind: str = opt("folder", Choice(_source_kinds))  # the source registry's kinds
    uri: str = opt("", STR)
    loop: bool = opt(True, BOOL)
    width: int = opt(640, Int(1, 16384))
    height: int = opt(480, Int(1, 16384))
    fps: float = opt(0.0, POS_FLOAT)  # 0 = as fast as possible
    stall_timeout_s: float = opt(5.0, Float(lo=0.1))
    reopen_backoff_max_s: float = opt(30.0, Float(lo=0.1))
    # picamera2: the lores format to ask for ("" = YUV420); what the camera gives is converted
    format: str = opt("", Choice("", "YUV420", "YVU420", "NV12", "NV21", "RGB888", "BGR888", "XRGB8888",
                                 "XBGR8888"))


CAMERA_ID = Str(r"[A-Za-z0-9_-]{1,32}", "camera id of 1-32 letters, digits, '_' or '-'")
CLASSES = StrList(Str(r"[^,]+", "class name"))


@dataclass(frozen=True)
class CameraConfig(SourceConfig):
    """One ``[[cameras]]`` entry: an id, the ``[source]`` keys, and its own watched classes
    (empty = ``homeassistant.classes``). A legacy ``[source]`` is the one camera with id ""."""
    id: str = opt("", CAMERA_ID)
    classes: Tuple[str, ...] = opt((), CLASSES)


@dataclass(frozen=True)
class ModelConfig:
    path: str = opt("", PATH)
    name: str = opt("", STR)  # name in the model store / manifest
    mirror: str = opt("", PATH)  # local folder with manifest files: fetch model.name from it (offline)
    labels: str = opt("", PATH)
    runtime: str = opt("auto", Choice(_runtime_choices))  # auto or a registered runtime
    threads: int = opt(0, Int(0, 256))  # threads per interpreter; 0 = automatic (inference/layout.py)
    # Interpreters running frames side by side, each with `threads` threads: 1 = the lowest latency;
    # N with threads = cores / N = the most frames per second. 0 = automatic: one per core when frames
    # come faster than one interpreter serves them, else one on all cores (docs/performance.md).
    interpreters: int = opt(0, Int(0, 16))
    edgetpu: str = opt("", EDGETPU)
    cpu_fallback: str = opt("", PATH)
    preprocess: str = opt("letterbox", Choice("letterbox", "stretch"))
    inference_timeout_s: float = opt(10.0, Float(lo=0.1))
    # What the model's own metadata/tensors leave open (README "Bring your own model"):
    normalization: str = opt("", Choice("", "-1..1", "0..1", "raw"))  # "" = from the model
    input_mean: str = opt("", NUMBERS)  # per channel "R,G,B" or one value; with input_std
    input_std: str = opt("", NUMBERS)
    output_layout: str = opt("auto", Choice("auto", "nhwc", "nchw"))
    output: str = opt("", STR)  # output tensor name (or index) when there are several
    output_scores: str = opt("auto", Choice("auto", "probability", "logit"))  # single-channel maps
    threshold: float = opt(0.5, Float(0.0, 1.0))  # single-channel maps: foreground above it


@dataclass(frozen=True)
class PublishConfig:
    mask_every_n: int = opt(1, Int(1))
    mask_max_hz: float = opt(0.0, POS_FLOAT)  # 0 = no cap
    mask_resolution: str = opt("model", Choice("model", "frame"))
    png_compression: int = opt(1, Int(0, 9))
    mask_format: str = opt("palette", Choice("palette", "grey"))  # grey: for consumers that decode with OpenCV
    result: bool = opt(True, BOOL)
    timings: str = opt("interval", Choice("frame", "interval"))
    timings_interval_s: float = opt(5.0, Float(lo=0.1))
    stats_interval_s: float = opt(30.0, Float(lo=0.1))
    overlay: bool = opt(False, BOOL)
    overlay_max_hz: float = opt(1.0, POS_FLOAT)
    overlay_jpeg_quality: int = opt(80, Int(1, 100))


@dataclass(frozen=True)
class MqttConfig:
    enabled: bool = opt(True, BOOL)
    host: str = opt("localhost", Str(r".+", "non-empty host name"))
    port: int = opt(1883, Int(1, 65535))
    client_id: str = opt("", STR)  # "" -> edge-agent-<device_id>
    protocol: str = opt("auto", Choice("auto", "5", "3.1.1", numbers=True))
    keepalive: int = opt(30, Int(5, 65535))
    username: str = opt("", STR)
    password: str = opt("", STR, secret=True)
    password_file: str = opt("", PATH)
    tls: bool = opt(False, BOOL)
    ca_file: str = opt("", PATH)
    cert_file: str = opt("", PATH)
    key_file: str = opt("", PATH)
    tls_insecure: bool = opt(False, BOOL)
    topic_prefix: str = opt("edge-agent", TOPIC_PREFIX)
    qos_state: int = opt(1, QOS)  # availability, info
    qos_mask: int = opt(0, QOS)
    qos_result: int = opt(0, QOS)
    qos_timings: int = opt(0, QOS)
    qos_stats: int = opt(0, QOS)
    reconnect_min_s: float = opt(1.0, Float(lo=0.01))
    reconnect_max_s: float = opt(30.0, Float(lo=0.01))
    max_queued_messages: int = opt(100, Int(1))
    # MQTT 5 response topics the agent may answer on besides its own <prefix>/<device>/<kind>/...
    response_topic_prefixes: Tuple[str, ...] = opt((), REPLY_PREFIXES)


@dataclass(frozen=True)
class BenchmarkConfig:
    max_runs: int = opt(1000, Int(1))
    max_seconds: float = opt(120.0, Float(lo=0.1))
    max_concurrent: int = opt(1, Int(1))


@dataclass(frozen=True)
class OutboxConfig:
    """Store-and-forward (docs/daemon.md): results, and masks within their own budget, kept in
    <state_dir>/outbox.sqlite3 while the broker is away and replayed after the reconnect."""
    enabled: bool = opt(True, BOOL)
    max_mb: float = opt(32.0, POS_FLOAT)  # results; beyond, the oldest go first (counted)
    mask_max_mb: float = opt(64.0, POS_FLOAT)  # masks, a budget of their own; 0 = masks are not kept
    replay_max_hz: float = opt(50.0, Float(lo=0.1))  # replayed messages per second at most


@dataclass(frozen=True)
class DeployConfig:
    public_key: str = opt("", STR)  # ed25519 public key, base64 or file path
    max_size_mb: int = opt(64, Int(1))
    keep_models: int = opt(3, Int(1))
    url_timeout_s: float = opt(60.0, Float(lo=0.1))


@dataclass(frozen=True)
class HomeAssistantConfig:
    enabled: bool = opt(False, BOOL)
    discovery_prefix: str = opt("homeassistant", TOPIC_PREFIX)
    classes: Tuple[str, ...] = opt((), CLASSES)  # empty = person, car, cat, dog, ... the labels have (README)
    min_fraction: float = opt(0.01, Float(0.0, 1.0))
    state_interval_s: float = opt(1.0, Float(lo=0.1))
    # the fleet console's URL: the device's "Visit" link in Home Assistant ("" = none)
    console_url: str = opt("", Str(r"|https?://[^\s/?#]+[^\s]*", "'' or an http:// or https:// URL"))


@dataclass(frozen=True)
class Config:
    agent: AgentConfig = field(default_factory=AgentConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    homeassistant: HomeAssistantConfig = field(default_factory=HomeAssistantConfig)
    # [[cameras]] (an array of tables, not a section: no EDGE_AGENT_/--set for it); empty = [source]
    cameras: Tuple[CameraConfig, ...] = ()

    def camera_list(self) -> Tuple[CameraConfig, ...]:
        """The cameras the agent runs: ``[[cameras]]``, or ``[source]`` as the one camera "" ."""
        if self.cameras:
            return self.cameras
        return (CameraConfig(**dataclasses.asdict(self.source)),)

    def to_dict(self, mask_secrets: bool = True) -> Dict[str, Dict[str, Any]]:
        """Plain nested dict; non-empty secrets, and passwords inside URLs (``source.uri``,
        ``model.mirror``: :func:`mask_url_secrets`), replaced by ``***`` unless asked otherwise."""
        out: Dict[str, Dict[str, Any]] = {}
        for section, cls in SECTIONS.items():
            values = dataclasses.asdict(getattr(self, section))
            if mask_secrets:
                for f in fields(cls):
                    if f.metadata.get("secret") and values[f.name]:
                        values[f.name] = MASK
                    else:
                        values[f.name] = mask_url_secrets(values[f.name])
            out[section] = values
        if self.cameras:
            out["cameras"] = [{k: mask_url_secrets(v) if mask_secrets else v
                               for k, v in dataclasses.asdict(c).items()} for c in self.cameras]
        return out


# Section name (no underscores, so EDGE_AGENT_<SECTION>_<KEY> splits unambiguously) -> dataclass.
SECTIONS: Dict[str, type] = {f.name: f.default_factory for f in fields(Config)  # type: ignore[misc]
                             if f.name != CAMERAS}


def _specs(cls: type) -> Dict[str, Field]:
    return {f.name: f.metadata["spec"] for f in fields(cls)}


# --------------------------------------------------------------------------- loading


class Problems:
    """Every config problem of one load, so ``config check`` names them all in one run."""

    def __init__(self) -> None:
        self.lines: List[str] = []

    @contextmanager
    def collect(self) -> Iterator[None]:
        """Run a check; a ConfigError it raises is noted and the load goes on."""
        try:
            yield
        except ConfigError as exc:
            self.lines.extend(line for line in exc.errors if line not in self.lines)

    def add(self, line: str) -> None:
        if line not in self.lines:
            self.lines.append(line)

    def raise_if_any(self) -> None:
        if self.lines:
            raise ConfigError(errors=self.lines)


def load_config(
    path: Optional[str] = None,
    overrides: Sequence[str] = (),
    env: Mapping[str, str] = os.environ,
    problems: Optional[Problems] = None,
) -> Config:
    """Defaults < TOML file at ``path`` < ``EDGE_AGENT_*`` in ``env`` < ``overrides`` ("s.k=v").

    Raises one ConfigError listing every problem (``errors``), not just the first: a value that
    fails is left at its default so the cross-key checks still run on the rest. Given
    ``problems``, they are noted there instead and the config (with those defaults) returned
    (``config check`` goes on to the start-up checks); an unreadable file still raises."""
    collecting = problems is not None
    problems = problems if problems is not None else Problems()
    raw: Dict[str, Dict[str, Any]] = {name: {} for name in SECTIONS}
    cameras: List[Dict[str, Any]] = []
    if path:
        _merge_file(raw, _read_toml(path), problems, cameras)
    for key in sorted(env):
        with problems.collect():
            target = _env_target(key)
            if target is not None:
                section, name = target
                raw[section][name] = _parse_text(section, name, env[key], f" (from {key})")
    for item in overrides:
        with problems.collect():
            section, name, text = _split_set(item)
            raw[section][name] = _parse_text(section, name, text, " (from --set)")
    if cameras and raw["source"]:
        problems.add(f"{CAMERAS}: [[cameras]] and [source] are both set ({', '.join(sorted(raw['source']))}): "
                     "move the [source] settings into a [[cameras]] entry")
    cfg = Config(**{section: SECTIONS[section](**values) for section, values in raw.items()},
                 cameras=tuple(CameraConfig(**values) for values in cameras))
    cfg = _resolve(cfg, env, problems)
    if not collecting:
        problems.raise_if_any()
    return cfg


def _read_toml(path: str) -> Dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}): TOML files are UTF-8; "
                          "save it as UTF-8 without a byte-order mark") from None


def _merge_file(raw: Dict[str, Dict[str, Any]], data: Mapping[str, Any], problems: Problems,
                cameras: List[Dict[str, Any]]) -> None:
    """Validate every section/key of the parsed TOML and store the valid ones in ``raw``
    (``[[cameras]]`` entries in ``cameras``)."""
    for section, table in data.items():
        if section == CAMERAS:
            cameras.extend(_cameras(table, problems))
            continue
        if section not in SECTIONS:
            problems.add(f"{section}: unknown section{_suggest(section, SECTIONS)}")
            continue
        if not isinstance(table, dict):
            problems.add(f"{section}: expected a table ([{section}]), got {table!r}")
            continue
        specs = _specs(SECTIONS[section])
        for name, value in table.items():
            with problems.collect():
                try:
                    raw[section][name] = _spec_for(section, name, specs).validate(f"{section}.{name}", value)
                except Invalid as exc:
                    raise ConfigError(str(exc)) from None


def _cameras(tables: Any, problems: Problems) -> List[Dict[str, Any]]:
    """The valid values of each ``[[cameras]]`` entry (every problem noted, keyed cameras[i].key)."""
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        problems.add(f"{CAMERAS}: expected an array of tables ([[cameras]] entries), got {tables!r}")
        return []
    specs = _specs(CameraConfig)
    out: List[Dict[str, Any]] = []
    seen: Dict[str, int] = {}
    for i, table in enumerate(tables):
        values: Dict[str, Any] = {}
        for name, value in table.items():
            key = f"{CAMERAS}[{i}].{name}"
            if name not in specs:
                problems.add(f"{key}: unknown key{_suggest(name, specs)}")
                continue
            try:
                values[name] = specs[name].validate(key, value)
            except Invalid as exc:
                problems.add(str(exc))
        cam_id = values.get("id")
        if "id" not in table:
            problems.add(f"{CAMERAS}[{i}].id: required (1-32 letters, digits, '_' or '-'; used in topics)")
        elif cam_id is not None and cam_id in seen:
            problems.add(f"{CAMERAS}[{i}].id: {cam_id!r} is already the id of cameras[{seen[cam_id]}]; ids are unique")
        if cam_id is not None:
            seen.setdefault(cam_id, i)
        out.append(values)
    return out


def _env_target(var: str) -> Optional[Tuple[str, str]]:
    """``EDGE_AGENT_MQTT_PASSWORD_FILE`` -> ("mqtt", "password_file"); None if not a setting.

    Variables whose first token is not a section (e.g. ``EDGE_AGENT_CONFIG``) are left alone;
    a known section with an unknown key is a typo and is refused.
    """
    if not var.upper().startswith(ENV_PREFIX):
        return None
    section, _, name = var[len(ENV_PREFIX):].lower().partition("_")
    if section not in SECTIONS:
        return None
    specs = _specs(SECTIONS[section])
    if name not in specs:
        raise ConfigError(f"{var}: unknown key {section}.{name}{_suggest(name, specs)}")
    return section, name


def _split_set(item: str) -> Tuple[str, str, str]:
    key, eq, text = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not eq or not dot:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    if section not in SECTIONS:
        raise ConfigError(f"--set {item!r}: unknown section {section!r}{_suggest(section, SECTIONS)}")
    _spec_for(section, name, _specs(SECTIONS[section]))
    return section, name, text


def _spec_for(section: str, name: str, specs: Mapping[str, Field]) -> Field:
    if name not in specs:
        raise ConfigError(f"{section}.{name}: unknown key{_suggest(name, specs)}")
    return specs[name]


def _parse_text(section: str, name: str, text: str, origin: str) -> Any:
    try:
        return _specs(SECTIONS[section])[name].validate_text(f"{section}.{name}", text, origin)
    except Invalid as exc:
        raise ConfigError(str(exc)) from None


def _suggest(word: str, known: Iterable[str]) -> str:
    known = list(known)
    close = difflib.get_close_matches(word, known, n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known: {', '.join(known)})"


# --------------------------------------------------------------------------- derived values


def sanitise_device_id(name: str) -> str:
    """A hostname made safe for MQTT topics: first label, [A-Za-z0-9_-] only."""
    short = name.split(".", 1)[0]
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", short).strip("-")
    return cleaned or "edge-agent"


def default_state_dir(env: Mapping[str, str]) -> str:
    """systemd's $STATE_DIRECTORY (first entry if several), else the XDG-style user location."""
    state = env.get("STATE_DIRECTORY", "")
    if state:
        return state.split(":", 1)[0]
    return str(Path("~/.local/state/edge-agent").expanduser())


def _resolve(cfg: Config, env: Mapping[str, str], problems: Problems) -> Config:
    """Fill computed defaults, read secrets from files, and check keys that depend on each other."""
    agent = cfg.agent
    agent = dataclasses.replace(
        agent,
        device_id=agent.device_id or sanitise_device_id(socket.gethostname()),
        state_dir=str(Path(agent.state_dir).expanduser()) if agent.state_dir else default_state_dir(env),
    )
    if agent.device_id.lower() == FLEET_DEVICE:
        problems.add(f"agent.device_id: {agent.device_id!r} is reserved (the topic level of fleet-wide "
                     "commands); set another agent.device_id")
    password = ""
    with problems.collect():
        password = _mqtt_password(cfg.mqtt, env)
    mqtt = dataclasses.replace(
        cfg.mqtt,
        client_id=cfg.mqtt.client_id or f"edge-agent-{agent.device_id}",
        password=password,
    )
    for check in (_mqtt_problems(mqtt), _homeassistant_problems(cfg), _model_problems(cfg.model)):
        for line in check:
            problems.add(line)
    return dataclasses.replace(cfg, agent=agent, mqtt=mqtt)


def _read_secret(path: str, key: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as err:
        raise ConfigError(f"{key}: cannot read {path!r}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path!r} is not UTF-8 text") from None


def _mqtt_password(mqtt: MqttConfig, env: Mapping[str, str]) -> str:
    """Password precedence: mqtt.password, mqtt.password_file, $CREDENTIALS_DIRECTORY/mqtt_password."""
    if mqtt.password and mqtt.password_file:
        raise ConfigError("mqtt.password and mqtt.password_file are both set: use one")
    if mqtt.password:
        return mqtt.password
    if mqtt.password_file:
        return _read_secret(mqtt.password_file, "mqtt.password_file")
    cred_dir = env.get("CREDENTIALS_DIRECTORY", "")
    if cred_dir and (Path(cred_dir) / CREDENTIAL_MQTT_PASSWORD).is_file():
        return _read_secret(str(Path(cred_dir) / CREDENTIAL_MQTT_PASSWORD),
                            f"$CREDENTIALS_DIRECTORY/{CREDENTIAL_MQTT_PASSWORD}")
    return ""


def _model_problems(model: ModelConfig) -> Iterator[str]:
    if model.interpreters > 1 and model.edgetpu:
        yield ("model.interpreters: an Edge TPU runs one interpreter at a time; "
               "set model.interpreters = 1 (or model.edgetpu = \"\" to run on the CPU)")
    if model.normalization and (model.input_mean or model.input_std):
        yield (f"model.normalization: {model.normalization!r} and model.input_mean/input_std both say how "
               "to scale the input: set one of them")
    if bool(model.input_mean) != bool(model.input_std):
        yield "model.input_mean: set model.input_std too (mean and std go together)"


def _homeassistant_problems(cfg: Config) -> Iterator[str]:
    if not cfg.homeassistant.enabled:
        return
    if not cfg.mqtt.enabled:
        yield "homeassistant.enabled: needs mqtt.enabled = true (discovery goes through the broker)"
    if not cfg.publish.result:
        yield "homeassistant.enabled: needs publish.result = true (the class entities follow the results)"


def _mqtt_problems(mqtt: MqttConfig) -> Iterator[str]:
    if mqtt.reconnect_min_s > mqtt.reconnect_max_s:
        yield (f"mqtt.reconnect_min_s: expected <= mqtt.reconnect_max_s ({mqtt.reconnect_max_s}), "
               f"got {mqtt.reconnect_min_s}")
    if mqtt.key_file and not mqtt.cert_file:
        yield "mqtt.key_file: set mqtt.cert_file too (client certificate and key go together)"
    if mqtt.password and not mqtt.username:
        yield "mqtt.password: set mqtt.username too (MQTT has no password without a user)"
    if mqtt.tls:
        for key in ("ca_file", "cert_file", "key_file"):
            value = getattr(mqtt, key)
            if value and not Path(value).expanduser().is_file():
                yield f"mqtt.{key}: file not found: {value}"


# --------------------------------------------------------------------------- rendering


def to_toml(cfg: Config, mask_secrets: bool = True) -> str:
    """The effective config as TOML (tomllib has no writer; our values are simple scalars)."""
    data = cfg.to_dict(mask_secrets=mask_secrets)
    lines: List[str] = []
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]")
        specs = _specs(cls)
        for name, value in data[section].items():
            rendered = json.dumps(value) if value == MASK else specs[name].to_toml(value)
            lines.append(f"{name} = {rendered}")
        lines.append("")
    camera_specs = _specs(CameraConfig)
    for camera in data.get(CAMERAS, []):
        lines.append(f"[[{CAMERAS}]]")
        for name, value in camera.items():
            lines.append(f"{name} = {json.dumps(value) if value == MASK else camera_specs[name].to_toml(value)}")
        lines.append("")
    return "\n".join(lines)


def to_json(cfg: Config, mask_secrets: bool = True) -> str:
    return json.dumps(cfg.to_dict(mask_secrets=mask_secrets), indent=2)
