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
* ``protocol = "auto"`` speaks MQTT 5 and falls back to 3.1.1 for the rest of the process when
  the broker answers CONNACK "unsupported protocol version" (e.g. amqtt, old mosquitto).
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.config import MqttConfig
from edge_agent.errors import ConfigError

log = logging.getLogger(__name__)

ONLINE = b"online"
OFFLINE = b"offline"
AVAILABILITY = "availability"
INFO = "info"
FLEET = "all"
COMMAND_QOS = 1
STOP_FLUSH_TIMEOUT_S = 2.0
CONNACK_TIMEOUT_S = 10.0

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
# CONNECT is taken as "does not speak 5" too (amqtt and some 3.1.1 brokers just hang up).
CLOSED_BEFORE_CONNACK_LIMIT = 2
# CONNACK refusals caused by credentials: worth a hint in the log line.
_AUTH_REFUSALS = (0x04, 0x05, 0x86, 0x87, 0x8C)

Payload = Union[bytes, bytearray, memoryview, str, dict, list, None]
CommandCallback = Callable[[str, bytes, Dict[str, Any]], None]


def protocol_from_setting(setting: str) -> int:
    """paho's protocol constant to try first for mqtt.protocol ("auto" starts with MQTT 5)."""
    return paho.MQTTv311 if setting == "3.1.1" else paho.MQTTv5


def should_fall_back(setting: str, current: int, reason_code: Optional[int] = None,
                     closed_before_connack: int = 0) -> bool:
    """True when the broker evidently does not speak MQTT 5 and we may downgrade to 3.1.1.

    Evidence: a CONNACK "unsupported protocol version" (``reason_code``), or the broker hanging
    up before any CONNACK ``CLOSED_BEFORE_CONNACK_LIMIT`` times in a row.  Only ``auto`` falls
    back: an explicit ``protocol = "5"`` keeps failing loudly instead.
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


def apply_credentials(client: paho.Client, cfg: MqttConfig) -> None:
    """Username/password and TLS (CA, client cert/key) from ``[mqtt]``: agent and fleet client."""
    if cfg.username:
        client.username_pw_set(cfg.username, cfg.password or None)
    if cfg.tls:
        try:
            client.tls_set(ca_certs=cfg.ca_file or None, certfile=cfg.cert_file or None,
                           keyfile=cfg.key_file or None)
        except (OSError, ValueError) as err:  # ssl.SSLError is an OSError
            raise ConfigError(f"mqtt TLS files (ca_file/cert_file/key_file) unusable: {err}") from None
        if cfg.tls_insecure:
            client.tls_insecure_set(True)  # skips host name verification, like mosquitto_pub --insecure


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
        self._protocol = protocol_from_setting(cfg.protocol)
        self._lifecycle = threading.Lock()  # start/stop/protocol swap; never taken in callbacks
        self._lock = threading.Lock()  # counters, in-flight bookkeeping, handlers, info
        self._client: Optional[paho.Client] = None
        self._started = False
        self._stopping = False
        self._connected = threading.Event()
        self._info: Optional[bytes] = None
        self._info_sent = False  # the current info reached the client (else stop() sends it)
        self._handlers: List[Tuple[str, str, CommandCallback]] = []  # (filter, name, callback)
        self._inflight: Set[int] = set()
        self._acked_early: Set[int] = set()  # on_publish fired before publish() recorded the mid
        self._ever_connected = False
        self._last_fail = ""
        self._got_connack = False  # for the current connection attempt
        self._attempt = 0  # connection attempts so far, to match CONNACK timers to attempts
        self._closed_before_connack = 0  # consecutive attempts the broker hung up on
        self._counters: Dict[str, Any] = {
            "connects": 0, "reconnects": 0, "published": 0, "dropped": 0,
            "bytes_published": 0, "last_error": None,
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
        return "5" if self._protocol == paho.MQTTv5 else "3.1.1"

    def wait_connected(self, timeout: Optional[float] = None) -> bool:
        return self._connected.wait(timeout)

    def stats(self) -> Dict[str, Any]:
        """Counters for the stats topic: connects, reconnects, published, dropped, bytes, last_error."""
        with self._lock:
            out = dict(self._counters)
            out["inflight"] = len(self._inflight)
        out["connected"] = self.connected
        out["protocol"] = self.protocol
        return out

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Connect in the background; returns at once, a down broker is retried with backoff."""
        with self._lifecycle:
            if self._started:
                raise RuntimeError("MqttComms.start() called twice")
            self._started = True
            self._launch(self._protocol)

    def stop(self, timeout: float = STOP_FLUSH_TIMEOUT_S) -> None:
        """Publish retained ``offline``, disconnect cleanly (no Last Will) and join paho's thread."""
        with self._lifecycle:
            if self._stopping:
                return
            self._stopping = True
            client, self._client = self._client, None
        if client is None:
            return
        if self._connected.is_set():
            with self._lock:
                final_info = None if self._info_sent else self._info
            if final_info is not None:  # the last info (e.g. status "stopped") goes out before offline
                client.publish(self.topic(INFO), final_info, qos=self.cfg.qos_state, retain=True)
            info = client.publish(self.topic(AVAILABILITY), OFFLINE, qos=self.cfg.qos_state, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as err:
                log.debug("offline not flushed: %s", err)
        self._connected.clear()
        client.disconnect()
        client.loop_stop()
        log.info("MQTT stopped (%s)", self._summary())

    def __enter__(self) -> "MqttComms":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _launch(self, protocol: int) -> None:
        """Create a client for ``protocol`` and start its network thread (lifecycle lock held)."""
        self._protocol = protocol
        client = self._make_client(protocol)
        self._client = client
        if protocol == paho.MQTTv5:
            client.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive, clean_start=True)
        else:
            client.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive)
        client.loop_start()
        log.info("MQTT connecting to %s:%d as %s (MQTT %s%s)", self.cfg.host, self.cfg.port,
                 self.client_id, self.protocol, ", TLS" if self.cfg.tls else "")

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
        client.will_set(self.topic(AVAILABILITY), OFFLINE, qos=cfg.qos_state, retain=True)
        apply_credentials(client, cfg)
        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _fall_back_to_311(self, old: paho.Client) -> None:
        """Replace the MQTT 5 client by a 3.1.1 one (in a helper thread: paho cannot join itself)."""
        with self._lifecycle:
            if self._stopping or self._client is not old:
                return
            self._client = None
            old.disconnect()
            old.loop_stop()
            self._launch(paho.MQTTv311)

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
        if correlation_data is not None and self._protocol == paho.MQTTv5:
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
        client = self._client
        if client is not None and self.connected:
            client.subscribe([(f, COMMAND_QOS) for f in filters])

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
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

    def _on_pre_connect(self, client: paho.Client, userdata: Any) -> None:
        """Arm a CONNACK timer for this attempt (paho has none of its own)."""
        if client is not self._client:
            return
        self._attempt += 1
        self._got_connack = False
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
        with self._lock:
            self._inflight.clear()
            self._acked_early.clear()
            self._counters["connects"] += 1
            if self._ever_connected:
                self._counters["reconnects"] += 1
            self._ever_connected = True
            self._counters["last_error"] = None  # last_error says why we are NOT connected
            info = self._info
            filters = sorted({f for f, _, _ in self._handlers})
        self._last_fail = ""
        log.info("MQTT connected to %s:%d (MQTT %s)", self.cfg.host, self.cfg.port, self.protocol)
        self._publish(self.topic(AVAILABILITY), ONLINE, self.cfg.qos_state, True, None, client)
        if info is not None and self._publish(self.topic(INFO), info, self.cfg.qos_state, True, None, client):
            with self._lock:
                self._info_sent = self._info is info
        if filters:
            client.subscribe([(f, COMMAND_QOS) for f in filters])
        self._connected.set()  # after online/info: they always precede the pipeline's messages
        with self._lock:  # a handler added since the snapshot saw connected still unset: subscribe it here
            late = sorted({f for f, _, _ in self._handlers} - set(filters))
        if late:
            client.subscribe([(f, COMMAND_QOS) for f in late])

    def _connect_refused(self, client: paho.Client, code: int, reason: str) -> None:
        self._set_error(f"connection refused: {reason}")
        if should_fall_back(self.cfg.protocol, self._protocol, reason_code=code):
            self._start_fallback(client, reason)
            return
        hint = " (check mqtt.username and mqtt.password)" if code in _AUTH_REFUSALS else ""
        log.error("MQTT broker %s:%d refused the connection: %s%s; retrying with backoff",
                  self.cfg.host, self.cfg.port, reason, hint)

    def _start_fallback(self, client: paho.Client, why: str) -> None:
        log.warning("MQTT broker %s:%d does not accept MQTT 5 (%s); falling back to MQTT 3.1.1",
                    self.cfg.host, self.cfg.port, why)
        threading.Thread(target=self._fall_back_to_311, args=(client,), name="mqtt-fallback", daemon=True).start()

    def _closed_without_connack(self, client: paho.Client) -> None:
        """The TCP/TLS connection opened but the broker hung up before answering our CONNECT."""
        self._closed_before_connack += 1
        text = f"broker {self.cfg.host}:{self.cfg.port} closed the connection before CONNACK"
        self._set_error(text)
        if should_fall_back(self.cfg.protocol, self._protocol, closed_before_connack=self._closed_before_connack):
            self._start_fallback(client, "it hung up on MQTT 5 CONNECT")
            return
        log.error("MQTT %s (MQTT %s; check mqtt.protocol, mqtt.tls and the broker log); retrying with backoff",
                  text, self.protocol)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        if client is not self._client:
            return
        err = sys.exc_info()[1]  # paho calls us from inside its ``except OSError`` block
        text = f"cannot connect to {self.cfg.host}:{self.cfg.port}: {err or 'connection failed'}"
        self._set_error(text)
        # Same error again and again while the broker is down: say it once, then at debug level.
        level = logging.DEBUG if text == self._last_fail else logging.WARNING
        self._last_fail = text
        log.log(level, "MQTT %s; retrying with backoff (%.1f..%.1f s)", text,
                self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if client is not self._client:
            return
        was_connected = self._connected.is_set()
        self._connected.clear()
        with self._lock:
            self._inflight.clear()
            self._acked_early.clear()
        got_connack, self._got_connack = self._got_connack, False
        if not was_connected and not got_connack and not self._stopping:
            self._closed_without_connack(client)
            return
        if was_connected and not self._stopping:
            self._set_error(f"disconnected: {reason}")
            log.warning("MQTT disconnected from %s:%d (%s); reconnecting", self.cfg.host, self.cfg.port, reason)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._lock:
            if mid in self._inflight:
                self._inflight.discard(mid)
            elif client is self._client and len(self._acked_early) < 4 * self.cfg.max_queued_messages:
                self._acked_early.add(mid)

    def _set_error(self, text: str) -> None:
        with self._lock:
            self._counters["last_error"] = text

    def _summary(self) -> str:
        s = self.stats()
        return ", ".join(f"{k}={s[k]}" for k in ("connects", "reconnects", "published", "dropped"))
