"""The connect policy of every MQTT client of this product (the agent's comms and the host's fleet
client): MQTT 5 with a fallback to 3.1.1, reconnect backoff, CONNACK deadlines, and one diagnosed
log line per failed attempt. Topics and publishing are :mod:`edge_agent.comms.mqtt`'s.
"""

from __future__ import annotations

import logging
import socket
import ssl
import sys
import threading
from typing import Any, Callable, Dict, Optional, Tuple

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import MqttConfig
from edge_agent.output.throttle import Throttle
from edge_agent.comms.tls import _PLAIN_PORT, apply_credentials, diagnose, port_speaks_tls

log = logging.getLogger("edge_agent.comms.mqtt")  # the connection logs as the MQTT comms always did

CONNACK_TIMEOUT_S = 10.0
FAILURE_LOG_INTERVAL_S = 2.0  # at most one line per failed-attempt kind this often


# Reason codes a broker that does not speak MQTT 5 answers with (3.1.1's 0x01 or 5's 0x84).
_UNSUPPORTED_PROTOCOL = (0x01, 0x84)
# A broker that closes the connection this many times in a row before answering an MQTT 5
# CONNECT (for no reason TLS explains) is taken as "may not speak 5": a provisional fallback
# (amqtt and some 3.1.1 brokers just hang up; so does a broker restarting or at its limit).
CLOSED_BEFORE_CONNACK_LIMIT = 2
# CONNACK refusals caused by credentials: worth a hint in the log line.
_AUTH_REFUSALS = (0x04, 0x05, 0x86, 0x87, 0x8C)


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
        self._start_network(client)
        log.info("MQTT connecting to %s as %s (MQTT %s%s)", self.endpoint, self.client_id, self.protocol,
                 ", TLS" if self.cfg.tls else "")

    def _start_network(self, client: paho.Client) -> None:
        """Start the client's network I/O: paho's thread (bench/fleet_sim.py drives many clients
        from one loop instead)."""
        client.loop_start()

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
        self._arm_connack_timer(client, self._attempt)

    def _arm_connack_timer(self, client: paho.Client, attempt: int) -> None:
        """Call :meth:`_connack_timeout` after ``connack_timeout_s`` (a timer thread; the fleet
        simulator uses its loop's timers)."""
        timer = threading.Timer(self.connack_timeout_s, self._connack_timeout, args=(client, attempt))
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
