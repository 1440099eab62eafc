"""The agent's one MQTT connection: topic names, availability, info, publishing, commands.

Modelled on Frigate's ``comms/mqtt.py``: a single class owns the paho client and every topic
name, so the pipeline only says ``comms.publish("mask", png)``.  Design rules, and why:

* ``publish()`` never blocks and never queues without bound: the pipeline must keep its frame
  rate whatever the broker does.  While disconnected, or with more than ``max_queued_messages``
  unacknowledged messages in flight, a message is dropped and counted.
* The broker may be down at start, restart, or refuse us (bad password): paho's network thread
  keeps retrying with exponential backoff (``reconnect_min_s``..``reconnect_max_s``) and we log
  one clear line per failed attempt; nothing raises into the caller.
* After EVERY (re)connect the retained ``online`` and ``info`` are re-published and command
  subscriptions re-made (clean sessions: a restarted broker has forgotten everything).
  ``offline`` is the retained Last Will, and is published explicitly on a clean ``stop()``.
* ``protocol = "auto"`` speaks MQTT 5 and falls back to 3.1.1 (see :class:`MqttConnection`, the
  connect policy shared with the host's fleet client; docs/brokers.md says what degrades where).
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.config import FLEET_DEVICE, MqttConfig
from edge_agent.errors import ConfigError
from edge_agent.output.throttle import Throttle

log = logging.getLogger(__name__)

ONLINE = b"online"
OFFLINE = b"offline"
AVAILABILITY = "availability"
INFO = "info"
FLEET = FLEET_DEVICE  # <prefix>/all/cmd/...: fleet-wide commands
COMMAND_QOS = 1
STOP_FLUSH_TIMEOUT_S = 2.0
CONNACK_TIMEOUT_S = 10.0
FAILURE_LOG_INTERVAL_S = 2.0  # at most one line per failed-attempt kind this often

# First topic level under <prefix>/<device_id>/ -> the MqttConfig attribute holding its QoS.
_QOS_KEYS = {
    AVAILABILITY: "qos_state",
    INFO: "qos_state",
    "mask": "qos_mask",
    "overlay": "qos_mask",
    "result": "qos_result",
    "timings": "qos_timings",
    "stats": "qos_stats",
}

# Reason codes a broker that does not speak MQTT 5 answers with (3.1.1's 0x01 or 5's 0x84).
_UNSUPPORTED_PROTOCOL = (0x01, 0x84)
# A broker that closes the connection this many times in a row before answering an MQTT 5
# CONNECT (for no reason TLS explains) is taken as "may not speak 5": a provisional fallback
# (amqtt and some 3.1.1 brokers just hang up; so does a broker restarting or at its limit).
CLOSED_BEFORE_CONNACK_LIMIT = 2
# CONNACK refusals caused by credentials: worth a hint in the log line.
_AUTH_REFUSALS = (0x04, 0x05, 0x86, 0x87, 0x8C)

Payload = Union[bytes, bytearray, memoryview, str, dict, list, None]
CommandCallback = Callable[[str, bytes, Dict[str, Any]], None]
ListenerCallback = Callable[[str, bytes, bool], None]


def protocol_from_setting(setting: str) -> int:
    """paho's protocol constant to try first for mqtt.protocol ("auto" starts with MQTT 5)."""
    return paho.MQTTv311 if setting == "3.1.1" else paho.MQTTv5


def should_fall_back(setting: str, current: int, reason_code: Optional[int] = None,
                     closed_before_connack: int = 0) -> bool:
    """True when the broker evidently does not speak MQTT 5 and we may downgrade to 3.1.1.

    Evidence: a CONNACK "unsupported protocol version" (``reason_code``: for good), or the broker
    hanging up before any CONNACK ``CLOSED_BEFORE_CONNACK_LIMIT`` times in a row (provisional:
    see :class:`MqttConnection`).  Only ``auto`` falls back: an explicit ``protocol = "5"`` keeps
    failing loudly instead.
    """
    if setting != "auto" or current != paho.MQTTv5:
        return False
    if reason_code is not None:
        return reason_code in _UNSUPPORTED_PROTOCOL
    return closed_before_connack >= CLOSED_BEFORE_CONNACK_LIMIT


def encode_payload(payload: Payload) -> bytes:
    """bytes as is, str as UTF-8, dict/list as compact JSON, None as empty."""
    if payload is None:
        return b""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode("utf-8")
    if isinstance(payload, (dict, list)):
        return json.dumps(payload, separators=(",", ":"), default=str).encode("utf-8")
    raise TypeError(f"cannot publish {type(payload).__name__}: use bytes, str, dict or list")


def _check_topic_part(part: str, what: str) -> str:
    if not part or "+" in part or "#" in part or part.startswith("/") or part.endswith("/"):
        raise ValueError(f"invalid {what} {part!r}: no wildcards, no leading/trailing '/'")
    return part


def message_properties(props: Optional[Properties]) -> Dict[str, Any]:
    """The MQTT 5 request/response properties of a message as a plain dict (None under 3.1.1)."""
    return {
        "response_topic": getattr(props, "ResponseTopic", None) if props is not None else None,
        "correlation_data": getattr(props, "CorrelationData", None) if props is not None else None,
        "user_properties": dict(getattr(props, "UserProperty", []) or []) if props is not None else {},
    }


def tls_context(cfg: MqttConfig) -> ssl.SSLContext:
    """The TLS context of ``[mqtt]``: CA, and the client certificate/key pair loaded together.

    Raises ConfigError naming the setting when a file is unusable or the key does not belong to
    the certificate (``config check`` calls this too, so it finds what ``run`` would refuse).
    """
    ca = str(Path(cfg.ca_file).expanduser()) if cfg.ca_file else None
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    except (OSError, ValueError) as err:  # ssl.SSLError is an OSError
        raise ConfigError(f"mqtt.ca_file: cannot load {cfg.ca_file!r}: {err}") from None
    if cfg.cert_file:
        cert = str(Path(cfg.cert_file).expanduser())
        key = str(Path(cfg.key_file).expanduser()) if cfg.key_file else None
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ValueError) as err:
            what = "the key does not belong to the certificate" if "KEY_VALUES_MISMATCH" in str(err) else str(err)
            if not cfg.key_file:
                raise ConfigError(f"mqtt.cert_file: {cfg.cert_file!r} holds no usable private key: set "
                                  "mqtt.key_file to the certificate's key (or put the key in the same "
                                  "PEM file)") from None
            raise ConfigError(f"mqtt.cert_file/mqtt.key_file: cannot load the client certificate "
                              f"{cfg.cert_file!r} with key {cfg.key_file or cfg.cert_file!r}: {what}") from None
    if cfg.tls_insecure:
        ctx.check_hostname = False  # the chain is still verified; only the host name is not
    return ctx


def apply_credentials(client: paho.Client, cfg: MqttConfig) -> None:
    """Username/password and TLS (CA, client cert/key) from ``[mqtt]``: agent and fleet client."""
    if cfg.username:
        client.username_pw_set(cfg.username, cfg.password or None)
    if cfg.tls:
        client.tls_set_context(tls_context(cfg))
        if cfg.tls_insecure:
            client.tls_insecure_set(True)  # skips host name verification, like mosquitto_pub --insecure


_PLAIN_PORT = ("the port does not speak TLS: set mqtt.tls = false, or mqtt.port to the broker's TLS port "
               "(usually 8883)")
# What a failed attempt most likely means: (lower-case text in the error, explanation).
_DIAGNOSES: Tuple[Tuple[str, str], ...] = (
    ("certificate required", "the broker requires a client certificate: set mqtt.cert_file and mqtt.key_file"),
    ("alert certificate expired", "the broker rejected our client certificate: it has expired (mqtt.cert_file)"),
    ("alert certificate revoked", "the broker rejected our client certificate: it is revoked (mqtt.cert_file)"),
    ("alert unknown ca", "the broker rejected our client certificate: it does not trust the CA that "
                         "signed mqtt.cert_file"),
    ("alert bad certificate", "the broker rejected our client certificate (mqtt.cert_file): not signed "
                              "by a CA it trusts, expired, or not for client authentication"),
    ("alert certificate unknown", "the broker rejected our client certificate (mqtt.cert_file)"),
    ("alert handshake failure", "the TLS handshake failed: no common TLS version/cipher, or the broker "
                                "wants a client certificate (mqtt.cert_file)"),
    ("hostname mismatch", "the broker's certificate is not valid for mqtt.host {host!r}: connect by a name "
                          "the certificate lists, or set mqtt.tls_insecure = true (skips the name check)"),
    ("ip address mismatch", "the broker's certificate is not valid for mqtt.host {host!r}: connect by a "
                            "name the certificate lists, or set mqtt.tls_insecure = true (skips the name check)"),
    ("certificate has expired", "the broker's certificate has expired (or this device's clock is wrong)"),
    ("certificate is not yet valid", "the broker's certificate is not valid yet: check this device's clock"),
    ("unable to get local issuer", "the broker's certificate is not signed by a CA in mqtt.ca_file"),
    ("self-signed certificate", "the broker's certificate is not signed by a CA in mqtt.ca_file"),
    ("wrong version number", _PLAIN_PORT),
    ("connection refused", "nothing accepts connections on {host}:{port}: is the broker running, is mqtt.port right?"),
    ("name or service not known", "mqtt.host {host!r} does not resolve"),
    ("temporary failure in name resolution", "mqtt.host {host!r} does not resolve (no DNS?)"),
    ("timed out", "no answer from {host}:{port} (firewall, wrong mqtt.host, or the broker is overloaded)"),
)
CERTIFICATE_FAILURE = "certificate"  # any diagnosis naming a certificate is never a protocol problem


def diagnose(error: str, cfg: MqttConfig) -> Optional[str]:
    """The likely cause of a failed attempt, naming the setting that resolves it (None: unknown)."""
    low = error.lower()
    for needle, text in _DIAGNOSES:
        if needle in low:
            return text.format(host=cfg.host, port=cfg.port)
    return None


def port_speaks_tls(host: str, port: int, timeout: float = 1.5) -> bool:
    """True when ``host:port`` completes a TLS handshake (certificates not checked): a TLS-only port."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=host):
                return True
    except (OSError, ValueError):
        return False


class _FailureLog:
    """One line per failed attempt, at the same level every time, at most one per
    ``FAILURE_LOG_INTERVAL_S`` (the next line says how many attempts were not logged)."""

    def __init__(self, interval: float) -> None:
        self.throttle = Throttle(interval)
        self.skipped = 0

    def emit(self, level: int, fmt: str, *args: Any) -> None:
        if not self.throttle.ready():
            self.skipped += 1
            log.debug(fmt, *args)
            return
        if self.skipped:
            fmt += " (%d similar attempts not logged)"
            args = (*args, self.skipped)
            self.skipped = 0
        log.log(level, fmt, *args)

    def reset(self) -> None:
        self.throttle = Throttle(self.throttle.interval)
        self.skipped = 0


ConnectedHook = Callable[[paho.Client], None]


class MqttConnection:
    """The one way this product connects to a broker: the agent's comms and the host's fleet client.

    Owns the paho client and the connect policy (why: every client must behave alike on every
    broker):

    * credentials and TLS from ``[mqtt]`` (:func:`apply_credentials`);
    * ``protocol = "auto"``: MQTT 5 first. A CONNACK refusing the protocol version switches to
      3.1.1 for good. A broker hanging up before CONNACK ``CLOSED_BEFORE_CONNACK_LIMIT`` times in a
      row (amqtt; but also a broker restarting or at its connection limit) switches to 3.1.1
      provisionally: MQTT 5 is tried again after the next disconnect, and the switch only sticks
      when it happens twice in a row. Hang-ups explained by TLS (a rejected client certificate,
      plain TCP to a TLS port) never switch the protocol;
    * a CONNACK timeout per attempt, reconnects with backoff (paho's thread);
    * one diagnosed log line per failed attempt (what failed and the setting that resolves it),
      every attempt at the same level, rate limited (:class:`_FailureLog`); ``last_error`` and
      ``diagnosis`` keep the latest.

    The owner's hooks run on paho's network thread: ``on_connected(client)`` after a successful
    CONNACK and before ``connected`` is set, ``on_disconnected(was_connected)``, and paho's
    ``on_message``/``on_publish``/``on_subscribe`` as given.
    """

    def __init__(self, cfg: MqttConfig, client_id: str, *, will: Optional[Tuple[str, bytes, int, bool]] = None,
                 on_connected: Optional[ConnectedHook] = None,
                 on_disconnected: Optional[Callable[[bool], None]] = None,
                 on_message: Any = None, on_publish: Any = None, on_subscribe: Any = None,
                 connack_timeout_s: float = CONNACK_TIMEOUT_S, failure_level: Optional[int] = None) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.will = will
        # None: each failure at its own level; an owner that reports failures itself (the host
        # client's one-line error) passes logging.DEBUG.
        self.failure_level = failure_level
        self.connack_timeout_s = connack_timeout_s
        self._hooks = (on_connected, on_disconnected, on_message, on_publish, on_subscribe)
        self._protocol = protocol_from_setting(cfg.protocol)
        self._lifecycle = threading.Lock()  # start/stop/protocol swap; never taken in callbacks
        self._client: Optional[paho.Client] = None
        self._started = False
        self._stopping = False
        self.connected = threading.Event()
        self._got_connack = False  # for the current connection attempt
        self._attempt = 0  # connection attempts so far, to match CONNACK timers to attempts
        self._closed_before_connack = 0  # consecutive attempts the broker hung up on
        self._provisional = False  # on 3.1.1 because of hang-ups only: retry MQTT 5 after a disconnect
        self._provisional_in_a_row = 0
        self._socket_error: Optional[str] = None  # paho's last socket error of this attempt
        self._speaks_tls: Optional[bool] = None
        self.failures = 0  # consecutive failed attempts
        self.last_error: Optional[str] = None
        self.diagnosis: Optional[str] = None
        self._failure_log = _FailureLog(FAILURE_LOG_INTERVAL_S)

    @property
    def client(self) -> Optional[paho.Client]:
        return self._client

    @property
    def protocol(self) -> str:
        """"5" or "3.1.1": what the current client speaks (after a fallback, "3.1.1")."""
        return "5" if self._protocol == paho.MQTTv5 else "3.1.1"

    @property
    def is_mqtt5(self) -> bool:
        return self._protocol == paho.MQTTv5

    @property
    def endpoint(self) -> str:
        return f"{self.cfg.host}:{self.cfg.port}"

    def start(self) -> None:
        """Connect in the background; returns at once, a down broker is retried with backoff."""
        with self._lifecycle:
            if self._started:
                raise RuntimeError("MqttConnection.start() called twice")
            self._started = True
            self._launch(self._protocol)

    def stop(self, before_disconnect: Optional[Callable[[paho.Client], None]] = None) -> None:
        """Disconnect cleanly (no Last Will) and join paho's thread; ``before_disconnect(client)``
        runs first while still connected (e.g. to publish a retained ``offline``)."""
        with self._lifecycle:
            if self._stopping:
                return
            self._stopping = True
            client, self._client = self._client, None
        if client is None:
            return
        if before_disconnect is not None and self.connected.is_set():
            before_disconnect(client)
        self.connected.clear()
        client.disconnect()
        client.loop_stop()

    def _launch(self, protocol: int) -> None:
        """Create a client for ``protocol`` and start its network thread (lifecycle lock held)."""
        self._protocol = protocol
        self._closed_before_connack = 0
        client = self._make_client(protocol)
        self._client = client
        if protocol == paho.MQTTv5:
            client.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive, clean_start=True)
        else:
            client.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive)
        client.loop_start()
        log.info("MQTT connecting to %s as %s (MQTT %s%s)", self.endpoint, self.client_id, self.protocol,
                 ", TLS" if self.cfg.tls else "")

    def _make_client(self, protocol: int) -> paho.Client:
        cfg = self.cfg
        kwargs: Dict[str, Any] = {"client_id": self.client_id, "protocol": protocol}
        if protocol != paho.MQTTv5:
            kwargs["clean_session"] = True
        client = paho.Client(CallbackAPIVersion.VERSION2, **kwargs)
        if log.isEnabledFor(logging.DEBUG):
            # paho logs every loop pass without a socket at ERROR while the broker is down: only
            # useful when debugging; our callbacks report connection problems in one line each.
            client.enable_logger(logging.getLogger(__name__ + ".paho"))
        client.suppress_exceptions = True  # a bug in a callback must not kill the network thread
        client.reconnect_delay_set(cfg.reconnect_min_s, cfg.reconnect_max_s)  # type: ignore[arg-type]
        client.max_queued_messages_set(cfg.max_queued_messages)
        if self.will is not None:
            topic, payload, qos, retain = self.will
            client.will_set(topic, payload, qos=qos, retain=retain)
        apply_credentials(client, cfg)
        _, _, on_message, on_publish, on_subscribe = self._hooks
        client.on_log = self._on_log
        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        if on_message is not None:
            client.on_message = on_message
        if on_publish is not None:
            client.on_publish = on_publish
        if on_subscribe is not None:
            client.on_subscribe = on_subscribe
        return client

    def _switch_protocol(self, old: paho.Client, protocol: int) -> None:
        """Replace the client by one speaking ``protocol`` (in a helper thread: paho cannot join itself)."""
        with self._lifecycle:
            if self._stopping or self._client is not old:
                return
            self._client = None
            old.disconnect()
            old.loop_stop()
            self._launch(protocol)

    def _switch_later(self, client: paho.Client, protocol: int) -> None:
        threading.Thread(target=self._switch_protocol, args=(client, protocol), name="mqtt-protocol",
                         daemon=True).start()

    # -- paho callbacks (network thread) --------------------------------------------------------

    def _on_log(self, client: paho.Client, userdata: Any, level: int, text: str) -> None:
        if level == paho.MQTT_LOG_ERR and client is self._client and "socket" in text:
            self._socket_error = text  # e.g. "failed to receive on socket: [SSL: ...] alert ..."

    def _on_pre_connect(self, client: paho.Client, userdata: Any) -> None:
        """Arm a CONNACK timer for this attempt (paho has none of its own)."""
        if client is not self._client:
            return
        self._attempt += 1
        self._got_connack = False
        self._socket_error = None
        timer = threading.Timer(self.connack_timeout_s, self._connack_timeout, args=(client, self._attempt))
        timer.daemon = True
        timer.start()

    def _connack_timeout(self, client: paho.Client, attempt: int) -> None:
        if client is not self._client or attempt != self._attempt or self._got_connack:
            return
        sock = client.socket()
        if sock is None:  # still resolving / connecting TCP: paho's own socket timeout applies
            return
        log.debug("no CONNACK within %.1f s: closing the socket to retry", self.connack_timeout_s)
        try:
            sock.shutdown(socket.SHUT_RDWR)  # paho's loop sees EOF -> on_disconnect -> retry with backoff
        except OSError:
            pass

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if client is not self._client:
            return
        self._got_connack = True
        self._closed_before_connack = 0
        code = int(getattr(reason, "value", reason))
        if getattr(reason, "is_failure", code != 0):
            self._connect_refused(client, code, str(reason))
            return
        self.failures = 0
        self.diagnosis = None
        self.last_error = None  # connected: stats say so (the last failure is in the log)
        self._failure_log.reset()
        if self._provisional:
            self._provisional_in_a_row += 1
        else:
            self._provisional_in_a_row = 0
        log.info("MQTT connected to %s (MQTT %s%s)", self.endpoint, self.protocol,
                 ", will retry MQTT 5 after the next disconnect" if self._provisional else "")
        on_connected = self._hooks[0]
        if on_connected is not None:
            on_connected(client)
        self.connected.set()

    def _failed(self, level: int, error: str, diagnosis: Optional[str], action: str) -> None:
        self.failures += 1
        self.last_error = error
        self.diagnosis = diagnosis
        self._failure_log.emit(self.failure_level or level, "MQTT %s%s; %s", error, f": {diagnosis}" if diagnosis else "", action)

    def _connect_refused(self, client: paho.Client, code: int, reason: str) -> None:
        if should_fall_back(self.cfg.protocol, self._protocol, reason_code=code):
            self.last_error = f"connection refused: {reason}"
            log.warning("MQTT broker %s does not accept MQTT 5 (CONNACK: %s); falling back to MQTT 3.1.1",
                        self.endpoint, reason)
            self._provisional = False  # the broker said so: for good
            self._switch_later(client, paho.MQTTv311)
            return
        hint = "check mqtt.username and mqtt.password" if code in _AUTH_REFUSALS else None
        self._failed(logging.ERROR, f"broker {self.endpoint} refused the connection: {reason}", hint,
                     "retrying with backoff")

    def _closed_without_connack(self, client: paho.Client) -> None:
        """The TCP/TLS connection opened but the broker hung up before answering our CONNECT."""
        error = self._socket_error
        diagnosis = diagnose(error, self.cfg) if error else None
        if diagnosis is None and not self.cfg.tls:
            if self._speaks_tls is None:
                self._speaks_tls = port_speaks_tls(self.cfg.host, self.cfg.port)
            if self._speaks_tls:
                diagnosis = ("the port expects TLS: set mqtt.tls = true (with mqtt.ca_file), "
                             "or mqtt.port to its plain MQTT port")
        text = f"broker {self.endpoint} closed the connection before CONNACK"
        if error:
            text += f" ({error})"
        if diagnosis is None and self.cfg.tls and not self.cfg.cert_file:
            # A TLS broker that wants a client certificate hangs up after the handshake; the alert
            # saying so is not always read before the close (TLS 1.3): never blame the protocol then.
            diagnosis = ("the broker requires a client certificate: set mqtt.cert_file and mqtt.key_file "
                         "(or the broker is restarting or at its connection limit)")
        if diagnosis is None:  # only now is the protocol a suspect
            self._closed_before_connack += 1
            if should_fall_back(self.cfg.protocol, self._protocol, closed_before_connack=self._closed_before_connack):
                self.last_error = text
                sticky = self._provisional_in_a_row >= 1
                log.warning("MQTT broker %s hung up on MQTT 5 CONNECT %d times in a row; falling back to "
                            "MQTT 3.1.1 (%s)", self.endpoint, self._closed_before_connack,
                            "for good: it did so after the last reconnect too" if sticky
                            else "MQTT 5 is tried again after the next disconnect")
                self._provisional = not sticky
                self._switch_later(client, paho.MQTTv311)
                return
            diagnosis = ("likely causes: the broker does not accept MQTT " + self.protocol
                         + " (mqtt.protocol), wants TLS or a client certificate (mqtt.tls, mqtt.cert_file), "
                         "is restarting or at its connection limit (see the broker's log)")
            if self.cfg.protocol == "auto" and self._protocol == paho.MQTTv5:  # a fallback is still ahead
                self._failed(logging.WARNING, text, diagnosis, "retrying; MQTT 3.1.1 next if it hangs up again")
                return
        self._failed(logging.ERROR, text, diagnosis, "retrying with backoff")

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        if client is not self._client:
            return
        err = sys.exc_info()[1]  # paho calls us from inside its ``except OSError`` block
        error = f"cannot connect to {self.endpoint}: {err or 'connection failed'}"
        diagnosis = diagnose(error, self.cfg)
        if self.cfg.tls and isinstance(err, (ConnectionResetError, ssl.SSLEOFError)):
            # dropped during the handshake: a plain MQTT port resets on a TLS ClientHello
            if self._speaks_tls is None:
                self._speaks_tls = port_speaks_tls(self.cfg.host, self.cfg.port)
            if not self._speaks_tls:
                diagnosis = _PLAIN_PORT.format(host=self.cfg.host, port=self.cfg.port)
        self._failed(logging.WARNING, error, diagnosis,
                     f"retrying with backoff ({self.cfg.reconnect_min_s:g}..{self.cfg.reconnect_max_s:g} s)")

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if client is not self._client:
            return
        was_connected = self.connected.is_set()
        self.connected.clear()
        got_connack, self._got_connack = self._got_connack, False
        on_disconnected = self._hooks[1]
        if on_disconnected is not None:
            on_disconnected(was_connected)
        if self._stopping:
            return
        if not was_connected and not got_connack:
            self._closed_without_connack(client)
            return
        if was_connected:
            self.last_error = f"disconnected: {reason}"
            log.warning("MQTT disconnected from %s (%s); reconnecting", self.endpoint, reason)
            if self._provisional and self.cfg.protocol == "auto":
                self._provisional = False
                log.info("MQTT trying MQTT 5 again on %s (the fallback was provisional)", self.endpoint)
                self._switch_later(client, paho.MQTTv5)


class MqttComms:
    """Owns the connection to the broker and all topic names of one device.

    ``MqttComms(cfg.mqtt, cfg.agent.device_id)``; ``start()``; ``publish("result", {...})``;
    ``stop()``.  Thread-safe: ``publish``/``reply``/``set_info`` may be called from any thread.
    Command callbacks run on paho's network thread and must return quickly.
    """

    def __init__(self, cfg: MqttConfig, device_id: str, connack_timeout_s: float = CONNACK_TIMEOUT_S) -> None:
        """``connack_timeout_s``: an attempt (TCP + TLS + CONNECT) without CONNACK by then is
        abandoned and retried; paho alone would wait for keepalive expiry (minutes on 3.1.1
        brokers that stay silent on an MQTT 5 CONNECT)."""
        self.cfg = cfg
        self.connack_timeout_s = connack_timeout_s
        if "/" in device_id:
            raise ValueError(f"invalid device id {device_id!r}: one topic level, no '/'")
        self.device_id = _check_topic_part(device_id, "device id")
        self.client_id = cfg.client_id or f"edge-agent-{device_id}"
        self._base = f"{cfg.topic_prefix}/{device_id}"
        self._fleet = f"{cfg.topic_prefix}/{FLEET}"
        self._lock = threading.Lock()  # counters, in-flight bookkeeping, handlers, info
        self._conn = MqttConnection(
            cfg, self.client_id, will=(self.topic(AVAILABILITY), OFFLINE, cfg.qos_state, True),
            on_connected=self._on_connect, on_disconnected=self._on_disconnect,
            on_message=self._on_message, on_publish=self._on_publish, connack_timeout_s=connack_timeout_s)
        self._connected = self._conn.connected
        self._info: Optional[bytes] = None
        self._info_sent = False  # the current info reached the client (else stop() sends it)
        self._handlers: List[Tuple[str, str, CommandCallback]] = []  # (filter, name, callback)
        self._listeners: List[Tuple[str, ListenerCallback]] = []  # non-command subscriptions
        self._on_connected: List[Callable[[], None]] = []
        self._inflight: Set[int] = set()
        self._acked_early: Set[int] = set()  # on_publish fired before publish() recorded the mid
        self._ever_connected = False
        self._session = False  # connected, and on_connect took its snapshot of the handlers
        self._counters: Dict[str, Any] = {
            "connects": 0, "reconnects": 0, "published": 0, "dropped": 0, "bytes_published": 0,
        }

    # ------------------------------------------------------------------ topics

    def topic(self, suffix: str) -> str:
        """``<prefix>/<device_id>/<suffix>``."""
        return f"{self._base}/{_check_topic_part(suffix, 'topic suffix')}"

    def fleet_topic(self, suffix: str) -> str:
        """``<prefix>/all/<suffix>``: messages addressed to every device."""
        return f"{self._fleet}/{_check_topic_part(suffix, 'topic suffix')}"

    def default_qos(self, suffix: str) -> int:
        key = _QOS_KEYS.get(suffix.split("/", 1)[0])
        return int(getattr(self.cfg, key)) if key else 0

    # ------------------------------------------------------------------ state

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def protocol(self) -> str:
        """"5" or "3.1.1": what the current client speaks (after a fallback, "3.1.1")."""
        return self._conn.protocol

    @property
    def _client(self) -> Optional[paho.Client]:
        return self._conn.client

    def wait_connected(self, timeout: Optional[float] = None) -> bool:
        return self._connected.wait(timeout)

    def stats(self) -> Dict[str, Any]:
        """Counters for the stats topic: connects, reconnects, published, dropped, bytes, last_error."""
        with self._lock:
            out = dict(self._counters)
            out["inflight"] = len(self._inflight)
        out["last_error"] = self._conn.last_error
        out["connected"] = self.connected
        out["protocol"] = self.protocol
        return out

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Connect in the background; returns at once, a down broker is retried with backoff."""
        self._conn.start()

    def stop(self, timeout: float = STOP_FLUSH_TIMEOUT_S) -> None:
        """Publish retained ``offline``, disconnect cleanly (no Last Will) and join paho's thread."""
        def offline(client: paho.Client) -> None:
            with self._lock:
                final_info = None if self._info_sent else self._info
            if final_info is not None:  # the last info (e.g. status "stopped") goes out before offline
                client.publish(self.topic(INFO), final_info, qos=self.cfg.qos_state, retain=True)
            info = client.publish(self.topic(AVAILABILITY), OFFLINE, qos=self.cfg.qos_state, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as err:
                log.debug("offline not flushed: %s", err)

        if self._conn.client is None:
            return
        self._conn.stop(before_disconnect=offline)
        log.info("MQTT stopped (%s)", self._summary())

    def __enter__(self) -> "MqttComms":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ publishing

    def publish(self, suffix: str, payload: Payload, qos: Optional[int] = None, retain: bool = False) -> bool:
        """Publish on ``<prefix>/<device_id>/<suffix>``; False (and counted) if dropped. Never blocks."""
        q = self.default_qos(suffix) if qos is None else qos
        return self._publish(self.topic(suffix), encode_payload(payload), q, retain, None)

    def reply(self, topic: str, payload: Payload, correlation_data: Optional[bytes] = None,
              qos: int = COMMAND_QOS) -> bool:
        """Answer a command on its MQTT 5 response topic, echoing the correlation data.

        Which response topics are acceptable is the command channel's decision
        (``commands.response_topic_refusal``); ``$`` topics are refused here as well."""
        _check_topic_part(topic, "reply topic")
        if topic.startswith("$"):
            raise ValueError(f"invalid reply topic {topic!r}: '$' topics are the broker's")
        props = None
        if correlation_data is not None and self._conn.is_mqtt5:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = bytes(correlation_data)
        return self._publish(topic, encode_payload(payload), qos, False, props)

    def set_info(self, info: Dict[str, Any]) -> None:
        """Set the retained ``info`` document; published now if connected and after every reconnect."""
        data = encode_payload(info)
        with self._lock:
            self._info = data
            self._info_sent = False
        if self.connected and self._publish(self.topic(INFO), data, self.cfg.qos_state, True, None):
            with self._lock:
                self._info_sent = self._info is data

    def publish_topic(self, topic: str, payload: Payload, qos: int = 1, retain: bool = False) -> bool:
        """Publish on a full topic outside ``<prefix>/<device_id>/``; never blocks, False if dropped.

        Only for topics this device owns elsewhere: its Home Assistant discovery configs
        (``comms/homeassistant.py`` checks that they name this device).
        """
        _check_topic_part(topic, "topic")
        return self._publish(topic, encode_payload(payload), qos, retain, None)

    def _publish(self, topic: str, data: bytes, qos: int, retain: bool,
                 props: Optional[Properties], client: Optional[paho.Client] = None) -> bool:
        """``client`` is passed only by on_connect, which publishes before announcing "connected"."""
        connected = client is not None or self._connected.is_set()
        client = client or self._client
        with self._lock:
            full = len(self._inflight) >= self.cfg.max_queued_messages
            if client is None or not connected or full:
                self._counters["dropped"] += 1
                return False
        info = client.publish(topic, data, qos=qos, retain=retain, properties=props)
        with self._lock:
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._counters["dropped"] += 1
                return False
            if info.mid in self._acked_early:
                self._acked_early.discard(info.mid)
            else:
                self._inflight.add(info.mid)
            self._counters["published"] += 1
            self._counters["bytes_published"] += len(data)
        return True

    # ------------------------------------------------------------------ commands

    def add_command_handler(self, name: str, callback: CommandCallback, subtree: bool = False) -> None:
        """Call ``callback(topic, payload, properties)`` for ``cmd/<name>`` on this device and fleet-wide.

        With ``subtree`` also ``cmd/<name>/...`` (one subscription ``cmd/<name>/#`` covers both).
        ``properties`` has response_topic, correlation_data (MQTT 5, else None) and user_properties.
        """
        _check_topic_part(name, "command name")
        suffix = f"cmd/{name}/#" if subtree else f"cmd/{name}"
        filters = [f"{self._base}/{suffix}", f"{self._fleet}/{suffix}"]
        with self._lock:
            self._handlers.extend((f, name, callback) for f in filters)
            live = self._session  # else on_connect's snapshot of the handlers includes it
        client = self._client
        if client is not None and live:
            client.subscribe([(f, COMMAND_QOS) for f in filters])

    def add_listener(self, topic_filter: str, callback: ListenerCallback) -> None:
        """Call ``callback(topic, payload, retained)`` for messages on ``topic_filter`` (not a
        command: retained messages are delivered too); subscribed again after every reconnect."""
        with self._lock:
            self._listeners.append((topic_filter, callback))
        client = self._client
        if client is not None and self.connected:
            client.subscribe(topic_filter, COMMAND_QOS)

    def add_connect_callback(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every (re)connect, once online/info are published and
        ``publish()`` works; runs on paho's network thread and must return quickly."""
        with self._lock:
            self._on_connected.append(callback)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            listeners = [cb for f, cb in self._listeners if paho.topic_matches_sub(f, msg.topic)]
        for listener in listeners:
            try:
                listener(msg.topic, bytes(msg.payload), bool(msg.retain))
            except Exception:  # a broken listener must not take the connection down
                log.exception("listener failed on %s", msg.topic)
        if listeners:
            return
        if msg.retain:
            log.warning("ignoring retained command on %s: publish commands with retain=false", msg.topic)
            return
        with self._lock:
            handlers = [(name, cb) for f, name, cb in self._handlers if paho.topic_matches_sub(f, msg.topic)]
        called: Set[int] = set()
        for name, callback in handlers:
            if id(callback) in called:
                continue
            called.add(id(callback))
            try:
                callback(msg.topic, bytes(msg.payload), message_properties(getattr(msg, "properties", None)))
            except Exception:  # a broken handler must not take the connection down
                log.exception("command handler %r failed on %s", name, msg.topic)

    # ------------------------------------------------------------------ paho callbacks (network thread)

    def _on_connect(self, client: paho.Client) -> None:
        """Connected (the connection's hook, before ``connected`` is set): online, info, subscriptions."""
        with self._lock:
            self._inflight.clear()
            self._acked_early.clear()
            self._counters["connects"] += 1
            if self._ever_connected:
                self._counters["reconnects"] += 1
            self._ever_connected = True
            self._counters["last_error"] = None  # last_error says why we are NOT connected
            info = self._info
            filters = sorted({f for f, _, _ in self._handlers} | {f for f, _ in self._listeners})
            connected_callbacks = list(self._on_connected)
            self._session = True  # a handler added from now on subscribes itself
        self._publish(self.topic(AVAILABILITY), ONLINE, self.cfg.qos_state, True, None, client)
        if info is not None and self._publish(self.topic(INFO), info, self.cfg.qos_state, True, None, client):
            with self._lock:
                self._info_sent = self._info is info
        if filters:
            client.subscribe([(f, COMMAND_QOS) for f in filters])
        # Connected from here on (the connection sets the same event after this hook returns):
        # online/info always precede the pipeline's messages, and connect callbacks can publish.
        self._connected.set()
        for callback in connected_callbacks:
            try:
                callback()
            except Exception:  # e.g. a discovery announcement bug: the connection stays up
                log.exception("connect callback failed")

    def _on_disconnect(self, was_connected: bool) -> None:
        with self._lock:
            self._session = False
            self._inflight.clear()
            self._acked_early.clear()

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._lock:
            if mid in self._inflight:
                self._inflight.discard(mid)
            elif client is self._client and len(self._acked_early) < 4 * self.cfg.max_queued_messages:
                self._acked_early.add(mid)

    def _summary(self) -> str:
        s = self.stats()
        return ", ".join(f"{k}={s[k]}" for k in ("connects", "reconnects", "published", "dropped"))
