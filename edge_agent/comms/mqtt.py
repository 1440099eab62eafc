"""The agent's one MQTT connection: topic names, availability, info, publishing, commands.

Modelled on Frigate's ``comms/mqtt.py``: a single class owns the paho client and every topic
name, so the pipeline only says ``comms.publish("mask", png)``.  Design rules, and why:

* ``publish()`` never blocks and never queues without bound: the pipeline must keep its frame
  rate whatever the broker does.  While disconnected, or with more than ``max_queued_messages``
  unacknowledged messages in flight, a message is dropped and counted; results and masks go to
  the persistent outbox instead when there is one (:mod:`edge_agent.comms.outbox`, ``[outbox]``),
  which replays them after the reconnect.
* The broker may be down at start, restart, or refuse us (bad password): paho's network thread
  keeps retrying with exponential backoff (``reconnect_min_s``..``reconnect_max_s``) and we log
  one clear line per failed attempt; nothing raises into the caller.
* After EVERY (re)connect the retained ``online`` and ``info`` are re-published and command
  subscriptions re-made (clean sessions: a restarted broker has forgotten everything).
  ``offline`` is the retained Last Will, and is published explicitly on a clean ``stop()``.
* ``protocol = "auto"`` speaks MQTT 5 and falls back to 3.1.1 (see
  :class:`~edge_agent.comms.connection.MqttConnection`, the connect policy shared with the host's
  fleet client; docs/brokers.md says what degrades where). TLS and the diagnosis of failed
  attempts are :mod:`edge_agent.comms.tls`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.config import FLEET_DEVICE, MqttConfig
from edge_agent.comms.connection import CONNACK_TIMEOUT_S, MqttConnection
from edge_agent.comms.outbox import MASKS, REPLAYED_PROPERTY, RESULTS, Outbox, Replayer, Row, mark_replayed
from edge_agent.output.topics import CAMERA, camera_suffix
from edge_agent.output.throttle import Throttle

log = logging.getLogger(__name__)

ONLINE = b"online"
OFFLINE = b"offline"
AVAILABILITY = "availability"
INFO = "info"
FLEET = FLEET_DEVICE  # <prefix>/all/cmd/...: fleet-wide commands
COMMAND_QOS = 1
STOP_FLUSH_TIMEOUT_S = 2.0
MAX_REFUSALS_LOGGED = 256  # distinct (kind, topic, reason) logged once each; beyond, rate-limited
REFUSAL_LOG_INTERVAL_S = 60.0

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
# Last topic level -> outbox budget: what is history (kept while the broker is away); the rest
# (availability, info, stats, timings, overlays, replies) is state or expendable.
_OUTBOX_BUCKETS = {"result": RESULTS, "mask": MASKS}
REPLAY_INFLIGHT_SHARE = 4  # replay only while fewer than max_queued_messages / 4 are in flight


def camera_topic(prefix: str, device_id: str, camera: str, kind: str) -> str:
    """``{prefix}/{device_id}/{kind}`` for camera "" (a ``[source]`` config), else
    ``{prefix}/{device_id}/camera/{camera}/{kind}``; kind: mask, result, timings, overlay."""
    return f"{prefix}/{device_id}/{camera_suffix(camera, kind)}"


Payload = Union[bytes, bytearray, memoryview, str, dict, list, None]
CommandCallback = Callable[[str, bytes, Dict[str, Any]], None]
ListenerCallback = Callable[[str, bytes, bool], None]


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


def _refused(code: Any) -> bool:
    """A PUBACK/SUBACK reason code saying no (>= 0x80: MQTT 5 "Not authorized" 0x87, 3.1.1's
    SUBACK failure 0x80); 0x10 "No matching subscribers" is a success."""
    value = getattr(code, "value", code)
    return isinstance(value, int) and value >= 0x80


def _reason(code: Any) -> str:
    return str(code) if hasattr(code, "value") else f"reason code 0x{int(code):02x}"


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


class MqttComms:
    """Owns the connection to the broker and all topic names of one device.

    ``MqttComms(cfg.mqtt, cfg.agent.device_id)``; ``start()``; ``publish("result", {...})``;
    ``stop()``.  Thread-safe: ``publish``/``reply``/``set_info`` may be called from any thread.
    Command callbacks run on paho's network thread and must return quickly.
    """

    def __init__(self, cfg: MqttConfig, device_id: str, connack_timeout_s: float = CONNACK_TIMEOUT_S,
                 outbox: Optional[Outbox] = None) -> None:
        """``connack_timeout_s``: an attempt (TCP + TLS + CONNECT) without CONNACK by then is
        abandoned and retried; paho alone would wait for keepalive expiry (minutes on 3.1.1
        brokers that stay silent on an MQTT 5 CONNECT). ``outbox``: where results and masks go
        that the client cannot take (replayed after the reconnect; closed by ``stop()``)."""
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
            on_message=self._on_message, on_publish=self._on_publish, on_subscribe=self._on_subscribe,
            connack_timeout_s=connack_timeout_s)
        self._connected = self._conn.connected
        self._info: Optional[bytes] = None
        self._info_sent = False  # the current info reached the client (else stop() sends it)
        self._handlers: List[Tuple[str, str, CommandCallback]] = []  # (filter, name, callback)
        self._listeners: List[Tuple[str, ListenerCallback]] = []  # non-command subscriptions
        self._on_connected: List[Callable[[], None]] = []
        # mid -> (topic, bytes, kept) until the broker acks; kept: what the outbox needs if the
        # connection drops first ((bucket, ts, payload) of a live result/mask), or the row id of a replay
        self._inflight: Dict[int, Tuple[str, int, Any]] = {}
        # on_publish fired before publish() recorded the mid: mid -> the broker's refusal, or None
        self._acked_early: Dict[int, Optional[str]] = {}
        self._subscribing: Dict[int, List[str]] = {}  # SUBACK pending: mid -> filters
        self._subacked_early: Dict[int, List[Any]] = {}  # SUBACK before subscribe() returned the mid
        self._refusals_logged: Set[Tuple[str, str, str]] = set()  # (kind, topic, reason) said once
        self._refusal_throttle = Throttle(REFUSAL_LOG_INTERVAL_S)  # once that set is full
        self._ever_connected = False
        self._session = False  # connected, and on_connect took its snapshot of the handlers
        self._counters: Dict[str, Any] = {
            "connects": 0, "reconnects": 0, "published": 0, "dropped": 0, "bytes_published": 0,
        }
        # What the broker refused (MQTT 5 PUBACK / SUBACK reason code >= 0x80; 3.1.1: SUBACK 0x80
        # only, a 3.1.1 broker drops a denied publish silently): kind -> reason -> count.
        self._refused: Dict[str, Dict[str, int]] = {"publish": {}, "subscribe": {}}
        self._outbox = outbox
        self._replayer: Optional[Replayer] = None
        if outbox is not None:
            self._replayer = Replayer(outbox, self._replay, self._replay_ready, outbox.replay_max_hz)
        # Outbox rows the client retransmits itself after a reconnect (in flight at a disconnect):
        # mid -> (row id, replayed), valid for that client object only.
        self._resend: Dict[int, Tuple[int, bool]] = {}
        self._resend_client: Optional[paho.Client] = None

    # ------------------------------------------------------------------ topics

    def topic(self, suffix: str) -> str:
        """``<prefix>/<device_id>/<suffix>``."""
        return f"{self._base}/{_check_topic_part(suffix, 'topic suffix')}"

    def fleet_topic(self, suffix: str) -> str:
        """``<prefix>/all/<suffix>``: messages addressed to every device."""
        return f"{self._fleet}/{_check_topic_part(suffix, 'topic suffix')}"

    def default_qos(self, suffix: str) -> int:
        parts = suffix.split("/")
        kind = parts[2] if parts[0] == CAMERA and len(parts) > 2 else parts[0]  # camera/<id>/<kind>
        key = _QOS_KEYS.get(kind)
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
        """Counters for the stats topic: connects, reconnects, published, dropped, bytes, last_error,
        refused (what the broker refused: {"publish": {reason: n}, "subscribe": {reason: n}})."""
        with self._lock:
            out = dict(self._counters)
            out["inflight"] = len(self._inflight)
            out["refused"] = {kind: dict(reasons) for kind, reasons in self._refused.items()}
        out["last_error"] = self._conn.last_error
        out["connected"] = self.connected
        out["protocol"] = self.protocol
        return out

    def outbox_stats(self) -> Dict[str, Any]:
        """The backlog for ``stats.outbox`` (:meth:`Outbox.stats`); ``{"enabled": false}`` without one."""
        if self._outbox is None:
            return {"enabled": False}
        return {"enabled": True, **self._outbox.stats()}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Connect in the background; returns at once, a down broker is retried with backoff."""
        if self._replayer is not None:
            self._replayer.start()
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

        if self._replayer is not None:
            self._replayer.stop()
        if self._conn.client is None:
            self._close_outbox()
            return
        self._conn.stop(before_disconnect=offline)
        self._keep_unacknowledged(hold=False)  # the client and what it would retransmit are gone
        self._close_outbox()
        log.info("MQTT stopped (%s)", self._summary())

    def _close_outbox(self) -> None:
        if self._outbox is not None:
            if len(self._outbox):
                log.info("outbox: %d messages kept for the next start (%s)", len(self._outbox), self._outbox.path)
            self._outbox.close()

    def __enter__(self) -> "MqttComms":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ publishing

    def publish(self, suffix: str, payload: Payload, qos: Optional[int] = None, retain: bool = False) -> bool:
        """Publish on ``<prefix>/<device_id>/<suffix>``; False (and counted) if dropped. Never blocks."""
        q = self.default_qos(suffix) if qos is None else qos
        bucket = _OUTBOX_BUCKETS.get(suffix.rsplit("/", 1)[-1]) if self._outbox is not None and not retain else None
        if bucket is not None:
            q = max(q, 1)  # acknowledged: one lost with the connection is kept, not gone
        return self._publish(self.topic(suffix), encode_payload(payload), q, retain, None, bucket=bucket)

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
                 props: Optional[Properties], client: Optional[paho.Client] = None,
                 bucket: Optional[str] = None, row: Optional[int] = None) -> bool:
        """``client`` is passed only by on_connect, which publishes before announcing "connected".
        ``bucket``: a result/mask the outbox keeps if the client cannot take it (or loses it
        unacknowledged); ``row``: the outbox row this message replays (not counted as dropped
        when not taken: it stays in the outbox)."""
        ts = time.time()
        connected = client is not None or self._connected.is_set()
        client = client or self._client
        with self._lock:
            full = len(self._inflight) >= self.cfg.max_queued_messages
            refuse = client is None or not connected or full
            if refuse and bucket is None:
                self._counters["dropped"] += row is None
                return False
        if refuse:
            return self._store(topic, data, qos, ts, bucket)
        info = client.publish(topic, data, qos=qos, retain=retain, properties=props)
        early = False
        refusal = None
        with self._lock:
            taken = info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS
            if not taken and bucket is None:
                self._counters["dropped"] += row is None
                return False
            if not taken:
                pass
            elif info.mid in self._acked_early:
                early = True
                refusal = self._acked_early.pop(info.mid)
            else:
                kept = row if row is not None else (bucket, ts, data) if bucket is not None else None
                self._inflight[info.mid] = (topic, len(data), kept)
            if taken and refusal is None:
                self._counters["published"] += 1
                self._counters["bytes_published"] += len(data)
        if not taken:
            return self._store(topic, data, qos, ts, bucket)
        if early and row is not None:
            self._replayed(row, refusal is None)  # acknowledged before it was recorded
        if refusal is not None:
            self._refusal("publish", topic, refusal)
        return True

    # ------------------------------------------------------------------ store-and-forward

    def _store(self, topic: str, data: bytes, qos: int, ts: float, bucket: Optional[str]) -> bool:
        """Into the outbox (True once committed); counted as dropped when it cannot be kept."""
        row = self._outbox.put(topic, data, qos, ts, bucket) if self._outbox is not None and bucket else None
        if row is None:
            with self._lock:
                self._counters["dropped"] += 1
            return False
        if self._replayer is not None:
            self._replayer.wake()
        return True

    def _replay_ready(self) -> bool:
        with self._lock:
            few = len(self._inflight) < max(1, self.cfg.max_queued_messages // REPLAY_INFLIGHT_SHARE)
        return few and self._connected.is_set()

    def _replay(self, row: Row) -> Optional[int]:
        """Send one outbox row, marked as replayed, QoS >= 1 (the replayer's thread)."""
        client = self._client
        if client is None or not self._connected.is_set():
            return None
        props = None
        if self._conn.is_mqtt5:
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = [REPLAYED_PROPERTY]
        if not self._publish(row.topic, mark_replayed(row.payload), max(row.qos, 1), False, props, row=row.id):
            return None
        return row.id

    def _replayed(self, row: int, delivered: bool) -> None:
        if self._replayer is not None:
            self._replayer.acked(row, replayed=delivered)

    def _keep_unacknowledged(self, hold: bool) -> None:
        """The connection is gone: results/masks still unacknowledged go into the outbox (a
        replay's row is there already). ``hold``: the same client retransmits them after its
        reconnect (its acknowledgement deletes the row; the replayer leaves them alone)."""
        with self._lock:
            pending = list(self._inflight.items())
            self._inflight.clear()
        if self._outbox is None:
            return
        resend: Dict[int, Tuple[int, bool]] = {}
        for mid, (topic, _size, kept) in pending:
            if isinstance(kept, int):
                resend[mid] = (kept, True)
            elif kept is not None:
                bucket, ts, data = kept
                row = self._outbox.put(topic, data, 1, ts, bucket)
                if row is not None:
                    resend[mid] = (row, False)
                    if hold and self._replayer is not None:
                        self._replayer.hold(row)
        if not hold:
            if self._replayer is not None:
                self._replayer.release_all()
            resend = {}
        with self._lock:
            self._resend.update(resend)

    def _subscribe(self, client: paho.Client, filters: List[str]) -> None:
        """Subscribe (QoS 1) and remember which filters the SUBACK answers, to count refusals."""
        rc, mid = client.subscribe([(f, COMMAND_QOS) for f in filters])
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return
        with self._lock:
            early = self._subacked_early.pop(mid, None)
            if early is None:
                self._subscribing[mid] = list(filters)
        if early is not None:
            self._suback(list(filters), early)

    def _refusal(self, kind: str, topic: str, reason: str) -> None:
        """Count a refused publish/subscription; log it once per topic and reason (the broker's
        ACL, e.g. a device's credentials used for another device's topics)."""
        key = (kind, topic, reason)
        with self._lock:
            reasons = self._refused[kind]
            reasons[reason] = reasons.get(reason, 0) + 1
            first = key not in self._refusals_logged
            if first and len(self._refusals_logged) < MAX_REFUSALS_LOGGED:
                self._refusals_logged.add(key)
            elif first:
                first = self._refusal_throttle.ready()  # too many distinct ones: rate-limited
        if first:
            log.error("MQTT broker %s refused the %s %s: %s (its ACL for user %r, client id %s; "
                      "counted in stats.mqtt.refused, logged once per topic and reason)",
                      self._conn.endpoint, "publish on" if kind == "publish" else "subscription to",
                      topic, reason, self.cfg.username or None, self.client_id)

    def _suback(self, filters: List[str], codes: List[Any]) -> None:
        for topic, code in zip(filters, codes):
            if _refused(code):
                self._refusal("subscribe", topic, _reason(code))

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
            self._subscribe(client, filters)

    def add_listener(self, topic_filter: str, callback: ListenerCallback) -> None:
        """Call ``callback(topic, payload, retained)`` for messages on ``topic_filter`` (not a
        command: retained messages are delivered too); subscribed again after every reconnect."""
        with self._lock:
            self._listeners.append((topic_filter, callback))
        client = self._client
        if client is not None and self.connected:
            self._subscribe(client, [topic_filter])

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
        if self._outbox is not None and client is not self._resend_client:
            # a new client object (protocol switch, first connect): nothing is retransmitted, so
            # what the old one had in flight is the outbox's to replay
            with self._lock:
                self._resend.clear()
                self._resend_client = client
            self._keep_unacknowledged(hold=False)
        with self._lock:
            self._inflight.clear()
            self._acked_early.clear()
            self._subscribing.clear()
            self._subacked_early.clear()
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
            self._subscribe(client, filters)
        # Connected from here on (the connection sets the same event after this hook returns):
        # online/info always precede the pipeline's messages, and connect callbacks can publish.
        self._connected.set()
        if self._replayer is not None:
            self._replayer.wake()
        for callback in connected_callbacks:
            try:
                callback()
            except Exception:  # e.g. a discovery announcement bug: the connection stays up
                log.exception("connect callback failed")

    def _on_disconnect(self, was_connected: bool) -> None:
        if self._outbox is not None:
            with self._lock:
                self._resend_client = self._client
            self._keep_unacknowledged(hold=True)  # the same client retransmits them after its reconnect
        with self._lock:
            self._session = False
            self._inflight.clear()
            self._acked_early.clear()
            self._subscribing.clear()
            self._subacked_early.clear()

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        refusal = _reason(reason) if _refused(reason) else None
        resent = None
        with self._lock:
            sent = self._inflight.pop(mid, None)
            if sent is None and client is self._resend_client:
                resent = self._resend.pop(mid, None)  # retransmitted after a reconnect: in the outbox
            if sent is not None and refusal is not None:
                self._counters["published"] -= 1  # handed to the client, but the broker refused it
                self._counters["bytes_published"] -= sent[1]
            elif (sent is None and resent is None and client is self._client
                  and len(self._acked_early) < 4 * self.cfg.max_queued_messages):
                self._acked_early[mid] = refusal
        if sent is not None and isinstance(sent[2], int):
            self._replayed(sent[2], refusal is None)
        if resent is not None:
            self._replayed(resent[0], resent[1] and refusal is None)
        if sent is not None and refusal is not None:
            self._refusal("publish", sent[0], refusal)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        with self._lock:
            filters = self._subscribing.pop(mid, None)
            if filters is None and client is self._client and len(self._subacked_early) < 64:
                self._subacked_early[mid] = list(codes or [])
        if filters is not None:
            self._suback(filters, list(codes or []))

    def _summary(self) -> str:
        s = self.stats()
        return ", ".join(f"{k}={s[k]}" for k in ("connects", "reconnects", "published", "dropped"))
