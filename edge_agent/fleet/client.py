"""Host-side MQTT client for commands to one device or the whole fleet (benchmark, deploy, ...).

It connects exactly like the agent (:class:`edge_agent.comms.connection.MqttConnection`: credentials and
TLS from ``[mqtt]``, MQTT 5 with fallback to 3.1.1, diagnosed failures) and re-subscribes after a
reconnect. ``FleetClient(mqtt_config).connect()`` subscribes to the retained
``<prefix>/+/availability`` and ``<prefix>/+/info`` topics; :meth:`FleetClient.discover` also asks
every agent (``cmd/presence``, for brokers that do not deliver retained messages to wildcard
subscriptions) and merges both, so it knows which devices exist and which are online before it
sends anything. :meth:`FleetClient.request` then publishes one command (to named devices, or once to
``<prefix>/all/cmd/<name>``), and collects exactly one final answer per device from
``<prefix>/<device>/<kind>/<request id>`` (protocol: :mod:`edge_agent.comms.commands`):

* ``done`` / ``rejected`` / ``failed``: what the device answered;
* ``offline``: the device's availability is (or turns) ``offline`` before its final answer
  (retained state, or its Last Will after a crash/power loss): reported at once, never waited for;
* ``timeout``: no final answer within the timeout.

Fleet-wide requests expect every device discovered online, plus any device that answers although
it was not discovered (its retained state may have been cleared).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

import paho.mqtt.client as paho

from edge_agent.comms.commands import FINAL_STATUSES
from edge_agent.comms.connection import MqttConnection
from edge_agent.comms.mqtt import FLEET
from edge_agent.errors import EdgeAgentError

log = logging.getLogger(__name__)

DISCOVERY_S = 1.0
FLEET_GRACE_S = 1.0
CONNECT_TIMEOUT_S = 20.0  # room for two hang-ups before the 3.1.1 fallback on a silent broker
CONNACK_TIMEOUT_S = 5.0
GIVE_UP_AFTER = 3  # failed attempts (refused, TLS, nothing listening) before connect() raises
QUIET_S = 0.3  # discovery ends once nothing new arrived for this long (and every known device answered)
# What the broker sends us comes from many devices at once (1,000 answers to one fleet-wide
# request within a second). At QoS 1 mosquitto keeps 20 in flight and queues 1,000 more per
# client by default and DROPS the rest; at QoS 0 it writes them to our socket. Our sessions are
# clean either way: a lost connection loses what was in flight at either QoS.
SUBSCRIBE_QOS = 0
PRESENCE = "presence"
RETAINED = "retained"
OFFLINE = "offline"
TIMEOUT = "timeout"

AnswerCallback = Callable[[str, Dict[str, Any]], None]
MessageCallback = Callable[[str, bytes], None]  # (topic, payload), on paho's network thread


class FleetError(EdgeAgentError):
    """The broker cannot be reached or refuses us."""


@dataclass
class Device:
    id: str
    online: Optional[bool] = None  # None: no availability seen
    info: Optional[Dict[str, Any]] = None
    via: Tuple[str, ...] = ()  # how we know it: "retained" (availability/info), "presence" (it answered)


@dataclass
class Answer:
    """The outcome of one request on one device."""

    device: str
    status: str  # done | rejected | failed | offline | timeout
    reason: Optional[str] = None
    final: Optional[Dict[str, Any]] = None  # the device's final answer document
    accepted: Optional[Dict[str, Any]] = None
    last_progress: Optional[Dict[str, Any]] = None

    @property
    def ok(self) -> bool:
        return self.status == "done"


@dataclass
class _Pending:
    request_id: str
    kind: str
    expected: Set[str]
    fleet: bool
    answers: Dict[str, Answer] = field(default_factory=dict)  # finals only
    seen: Dict[str, Answer] = field(default_factory=dict)  # every device that said anything
    on_message: Optional[AnswerCallback] = None


def json_object(payload: bytes) -> Optional[Dict[str, Any]]:
    """A device's JSON document, or None for anything that is not a JSON object."""
    try:
        doc = json.loads(payload)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def tags_of(device: Device) -> List[str]:
    """The groups a device says it is in (``agent.tags``, published in its info)."""
    tags = (device.info or {}).get("tags") or []
    return [str(t) for t in tags] if isinstance(tags, list) else []


def select_group(devices: Dict[str, Device], tag: str) -> List[str]:
    """The online devices in group ``tag``; one line naming the known groups when there is none."""
    members = [d.id for d in devices.values() if d.online and tag in tags_of(d)]
    if not members:
        known = sorted({t for d in devices.values() for t in tags_of(d)})
        raise EdgeAgentError(f"no device online in group {tag!r} (groups seen: {', '.join(known) or 'none'}; "
                             "a device's groups are its agent.tags)")
    return sorted(members)


def new_request_id() -> str:
    return uuid.uuid4().hex[:20]


class FleetClient:
    """One broker connection used to talk to the devices under ``mqtt.topic_prefix``."""

    def __init__(self, mqtt: Any, client_id: Optional[str] = None,
                 connack_timeout_s: float = CONNACK_TIMEOUT_S) -> None:
        self.cfg = mqtt
        self.prefix = mqtt.topic_prefix
        self.client_id = client_id or f"edge-agent-fleet-{uuid.uuid4().hex[:8]}"
        self._cond = threading.Condition()
        self._devices: Dict[str, Device] = {}
        self._pending: Optional[_Pending] = None
        self._presence: Optional[str] = None  # request id of the presence query being collected
        self._subacks: Set[int] = set()
        self._generation = 0  # connections so far: a subscribe() sees when a reconnect resubscribed
        self._resub_mid: Optional[int] = None
        self._filters: Set[str] = set()  # re-subscribed after every reconnect
        self._last_state_at = 0.0
        self._listeners: List[Tuple[str, MessageCallback]] = []  # listen() with wildcard filters
        # listen() with plain topics, by topic: a rollout listens to 2 topics of each of 1,000
        # devices, and matching every message against 2,000 filters starved paho's thread.
        self._exact: Dict[str, List[MessageCallback]] = {}
        self.discovery = "not run"  # how the last discover() found the devices, for the user
        self._refused: Dict[int, str] = {}  # mid -> the broker's refusal (MQTT 5 PUBACK >= 0x80)
        self._conn = MqttConnection(mqtt, self.client_id, on_connected=self._on_connect,
                                    on_message=self._on_message, on_subscribe=self._on_subscribe,
                                    on_publish=self._on_publish,
                                    connack_timeout_s=connack_timeout_s,
                                    failure_level=logging.DEBUG)  # connect() says what failed, once

    @property
    def _client(self) -> Optional[paho.Client]:
        return self._conn.client

    @property
    def protocol(self) -> str:
        """The MQTT version spoken ("5", or "3.1.1" after a fallback)."""
        return self._conn.protocol

    # -- connection -------------------------------------------------------------------------------
    def connect(self, timeout: float = CONNECT_TIMEOUT_S) -> "FleetClient":
        """Connect (MQTT 5, falling back to 3.1.1 like the agent); FleetError saying what failed."""
        conn = self._conn
        conn.start()
        deadline = time.monotonic() + timeout
        while not conn.connected.wait(0.05):
            if time.monotonic() >= deadline or conn.failures >= GIVE_UP_AFTER:
                self.close()
                raise FleetError(self._failure(timeout))
        self.subscribe([f"{self.prefix}/+/availability", f"{self.prefix}/+/info"])
        return self

    @property
    def connected(self) -> bool:
        """Connected to the broker now (the connection reconnects by itself after a loss)."""
        return self._conn.connected.is_set()

    def _failure(self, timeout: float) -> str:
        conn = self._conn
        if conn.last_error is None:
            return f"no answer from the broker {conn.endpoint} within {timeout:.0f} s (MQTT {conn.protocol})"
        text = conn.last_error if conn.last_error.startswith(("cannot", "broker")) else \
            f"cannot connect to the broker {conn.endpoint}: {conn.last_error}"
        return text + (f": {conn.diagnosis}" if conn.diagnosis else "")

    def close(self) -> None:
        self._conn.stop()

    def __enter__(self) -> "FleetClient":
        return self.connect()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _connected_client(self, timeout: float) -> paho.Client:
        """The client once connected: a reconnect in progress (broker restart) is waited for."""
        client = self._client
        if client is None:
            raise FleetError("not connected")
        if not self._conn.connected.wait(timeout):
            raise FleetError(f"not connected to the broker {self._conn.endpoint} for {timeout:g} s"
                             + (f" ({self._conn.last_error})" if self._conn.last_error else ""))
        return client

    def subscribe(self, filters: List[str], timeout: float = 10.0) -> None:
        """Subscribe (``SUBSCRIBE_QOS``) and wait for the broker's SUBACK: nothing sent before is
        missed after. The filters are subscribed again after a reconnect."""
        client = self._connected_client(timeout)
        with self._cond:
            self._filters.update(filters)
            generation = self._generation
            rc, mid = client.subscribe([(f, SUBSCRIBE_QOS) for f in filters])

            def acked() -> bool:  # ours, or the resubscription after a reconnect that lost ours
                return mid in self._subacks or (self._generation != generation and self._resub_mid in self._subacks)

            if (rc != paho.MQTT_ERR_SUCCESS and self._generation == generation) or not self._cond.wait_for(acked, timeout):
                raise FleetError(f"subscribing to {filters} failed")
            self._subacks.discard(mid)

    def listen(self, filters: List[str], callback: MessageCallback) -> None:
        """Subscribe to ``filters`` for as long as we are connected (again after a reconnect) and call
        ``callback(topic, payload)`` for every message matching one of them, after the client's own
        bookkeeping (so :meth:`devices` is already up to date). Runs on paho's thread: keep it short."""
        with self._cond:
            for f in filters:
                if "+" in f or "#" in f:
                    self._listeners.append((f, callback))
                else:
                    self._exact.setdefault(f, []).append(callback)
        self.subscribe(filters)

    def unsubscribe(self, filters: List[str]) -> None:
        with self._cond:
            self._filters.difference_update(filters)
        client = self._client
        if client is not None:
            client.unsubscribe(filters)

    # -- devices ----------------------------------------------------------------------------------
    def discover(self, wait: float = DISCOVERY_S, query: bool = True) -> Dict[str, Device]:
        """Devices known from retained availability/info and from a presence query (``query``).

        Returns after ``wait`` s, or earlier once every device retained as online answered the
        query and nothing new arrived for ``QUIET_S``. ``self.discovery`` says what was used.
        """
        start = time.monotonic()
        rid = new_request_id()
        answers = f"{self.prefix}/+/{PRESENCE}/{rid}"
        refused = ""
        if query:
            with self._cond:
                self._presence = rid
            self.subscribe([answers])
            try:
                self.publish(f"{self.prefix}/{FLEET}/cmd/{PRESENCE}", json.dumps({"request_id": rid}).encode())
            except FleetError:  # a viewer may read but not query: the retained states are all we get
                refused = "presence query refused by the broker (read-only credentials)"
        deadline = start + wait
        quiet = min(QUIET_S, wait)
        try:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if now >= deadline:
                        break
                    retained_online = {d.id for d in self._devices.values() if d.online and RETAINED in d.via}
                    answered = {d.id for d in self._devices.values() if PRESENCE in d.via}
                    if (self._devices and now - max(self._last_state_at, start) >= quiet
                            and (not query or refused or retained_online <= answered)):
                        break
                    self._cond.wait(min(0.05, deadline - now))
        finally:
            if query:
                with self._cond:
                    self._presence = None
                self.unsubscribe([answers])
        devices = self.devices()
        retained = sum(1 for d in devices.values() if RETAINED in d.via)
        answered = sum(1 for d in devices.values() if PRESENCE in d.via)
        how = [f"retained availability/info: {retained}"]
        if refused:
            how.append(refused)
        elif query:
            how.append(f"presence query: {answered} answered")
        self.discovery = f"{len(devices)} device(s) in {time.monotonic() - start:.1f} s ({'; '.join(how)})"
        return devices

    def devices(self) -> Dict[str, Device]:
        with self._cond:
            return {k: Device(v.id, v.online, v.info, v.via) for k, v in sorted(self._devices.items())}

    def online(self) -> List[str]:
        return [d.id for d in self.devices().values() if d.online]

    # -- commands ---------------------------------------------------------------------------------
    def request(self, command: str, params: Dict[str, Any], devices: Optional[Iterable[str]] = None,
                fleet: bool = False, timeout: float = 60.0, kind: Optional[str] = None,
                request_id: Optional[str] = None, on_message: Optional[AnswerCallback] = None,
                fleet_grace_s: float = FLEET_GRACE_S) -> Dict[str, Answer]:
        """Send ``command`` with ``params`` and return one :class:`Answer` per device.

        ``devices``: device ids (one publish each), or ``fleet=True``: one publish to
        ``<prefix>/all/cmd/<command>`` expecting every online device. ``kind`` names the answer
        topics (default: ``command``). ``on_message(device, doc)`` sees every answer (progress).
        """
        if self._client is None:
            raise FleetError("not connected")
        if fleet == (devices is not None):
            raise ValueError("give either devices or fleet=True")
        kind = kind or command
        rid = request_id or new_request_id()
        known = self.devices()
        targets = sorted(known) if fleet else list(dict.fromkeys(devices or ()))
        pending = _Pending(rid, kind, set(), fleet, on_message=on_message)
        for dev in targets:
            state = known.get(dev)
            if state is not None and state.online is False:
                if not fleet:  # fleet mode simply does not expect offline devices
                    pending.answers[dev] = Answer(dev, OFFLINE, "device is offline (retained availability)")
            elif fleet and (state is None or not state.online):
                continue
            else:
                pending.expected.add(dev)
        with self._cond:
            self._pending = pending
        try:
            self.subscribe([f"{self.prefix}/+/{kind}/{rid}"])
            payload = json.dumps({"request_id": rid, **params}).encode()
            if fleet:
                self.publish(f"{self.prefix}/{FLEET}/cmd/{command}", payload)
            else:
                for dev in sorted(pending.expected):
                    self.publish(f"{self.prefix}/{dev}/cmd/{command}", payload)
            self._wait(pending, timeout, fleet_grace_s if fleet else 0.0)
        finally:
            with self._cond:
                self._pending = None
            self.unsubscribe([f"{self.prefix}/+/{kind}/{rid}"])
        return dict(sorted(pending.answers.items()))

    def publish(self, topic: str, payload: bytes) -> None:
        """QoS 1 publish that returns once the broker acknowledged it (10 s at most); a refusal
        (MQTT 5 PUBACK reason >= 0x80, e.g. a viewer's credentials sending a command) is an error
        at once, not a wait for answers that cannot come."""
        client = self._connected_client(10.0)
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        with self._cond:
            refusal = self._refused.pop(info.mid, None)
        if refusal is not None:
            raise FleetError(f"the broker refused the publish on {topic}: {refusal} (these credentials "
                             f"({self.cfg.username or 'anonymous'}) may not publish there: commands need "
                             "an operator's)")

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        value = getattr(reason, "value", reason)
        if isinstance(value, int) and value >= 0x80:
            with self._cond:
                self._refused[mid] = str(reason) if hasattr(reason, "value") else f"reason code 0x{value:02x}"
                while len(self._refused) > 256:  # never waited for (fire-and-forget): bounded
                    self._refused.pop(next(iter(self._refused)))

    def _wait(self, pending: _Pending, timeout: float, grace: float) -> None:
        start = time.monotonic()
        deadline = start + timeout
        with self._cond:
            while True:
                waiting = pending.expected - set(pending.answers)
                now = time.monotonic()
                if not waiting and now - start >= grace:
                    return
                if now >= deadline:
                    for dev in sorted(waiting):
                        seen = pending.seen.get(dev)
                        what = "no final answer" if seen else "no answer"
                        pending.answers[dev] = Answer(dev, TIMEOUT, f"{what} within {timeout:g} s",
                                                      accepted=seen.accepted if seen else None,
                                                      last_progress=seen.last_progress if seen else None)
                    return
                self._cond.wait(min(deadline - now, 0.1))

    # -- paho callbacks (network thread) ------------------------------------------------------------
    def _on_connect(self, client: paho.Client) -> None:
        """(Re)connected: subscribe again to everything we listen to (clean sessions); a
        :meth:`subscribe` whose SUBACK the broken connection lost waits for this one."""
        with self._cond:
            filters = sorted(self._filters)
            self._generation += 1
            self._resub_mid = None
        if filters:
            _, mid = client.subscribe([(f, SUBSCRIBE_QOS) for f in filters])
            with self._cond:
                self._resub_mid = mid
                self._cond.notify_all()

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        with self._cond:
            self._subacks.add(mid)
            self._cond.notify_all()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if not msg.topic.startswith(self.prefix + "/"):
            return
        parts = msg.topic[len(self.prefix) + 1:].split("/")
        with self._cond:
            if len(parts) == 2 and parts[1] in ("availability", "info"):
                self._device_state(parts[0], parts[1], bytes(msg.payload))
            elif len(parts) == 3 and parts[1] == PRESENCE:
                self._presence_answer(parts[0], parts[2], bytes(msg.payload))
            elif len(parts) == 3:
                self._answer(parts[0], parts[1], parts[2], bytes(msg.payload))
            self._cond.notify_all()
            listeners = list(dict.fromkeys([*self._exact.get(msg.topic, ()),
                                            *(cb for f, cb in self._listeners if paho.topic_matches_sub(f, msg.topic))]))
        for callback in listeners:
            try:
                callback(msg.topic, bytes(msg.payload))
            except Exception:  # a listener's bug must not stop the network thread
                log.exception("fleet listener failed on %s", msg.topic)

    def _device_state(self, dev: str, what: str, payload: bytes) -> None:
        if dev == FLEET:
            return
        state = self._devices.setdefault(dev, Device(dev))
        self._last_state_at = time.monotonic()
        if RETAINED not in state.via:
            state.via += (RETAINED,)
        if what == "availability":
            state.online = payload == b"online"
            pending = self._pending
            if (payload == b"offline" and pending is not None and dev in pending.expected
                    and dev not in pending.answers):
                seen = pending.seen.get(dev)
                when = "after accepting the request" if seen and seen.accepted else "before answering"
                pending.answers[dev] = Answer(dev, OFFLINE, f"device went offline {when}",
                                              accepted=seen.accepted if seen else None,
                                              last_progress=seen.last_progress if seen else None)
        else:
            try:
                doc = json.loads(payload) if payload else None
            except ValueError:
                doc = None
            state.info = doc if isinstance(doc, dict) else None

    def _presence_answer(self, dev: str, rid: str, payload: bytes) -> None:
        if dev == FLEET or rid != self._presence:
            return
        try:
            doc = json.loads(payload)
        except ValueError:
            return
        if not isinstance(doc, dict) or doc.get("status") != "done":
            return
        state = self._devices.setdefault(dev, Device(dev))
        self._last_state_at = time.monotonic()
        state.online = True  # it answered just now: fresher than any retained state
        if isinstance(doc.get("info"), dict):
            state.info = doc["info"]
        if PRESENCE not in state.via:
            state.via += (PRESENCE,)

    def _answer(self, dev: str, kind: str, rid: str, payload: bytes) -> None:
        pending = self._pending
        if pending is None or kind != pending.kind or rid != pending.request_id or dev in pending.answers:
            return
        doc = json_object(payload)
        if doc is None:
            return
        if pending.fleet:
            pending.expected.add(dev)  # answered although not discovered: expect its final too
        seen = pending.seen.setdefault(dev, Answer(dev, "pending"))
        status = doc.get("status")
        if status == "accepted":
            seen.accepted = doc
        elif status == "progress":
            seen.last_progress = doc
        if status in FINAL_STATUSES:
            pending.answers[dev] = Answer(dev, status, doc.get("reason"), doc, seen.accepted, seen.last_progress)
        if pending.on_message is not None:
            try:
                pending.on_message(dev, doc)
            except Exception:  # a display problem must not lose answers
                pass
