"""TLS for every MQTT client of this product: the context from ``[mqtt]`` and what a failed attempt means.

``tls_context`` loads the CA and the client certificate/key pair together (``config check`` calls
it too, so it finds what ``run`` would refuse); ``diagnose`` turns a TLS or socket error into one
line naming the setting that resolves it.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
from pathlib import Path
from typing import Optional, Tuple

import paho.mqtt.client as paho

from edge_agent.config import MqttConfig
from edge_agent.errors import ConfigError


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


def tls_material(cfg: MqttConfig) -> Tuple[Optional[str], ...]:
    """A fingerprint of the CONTENTS of ``[mqtt]``'s TLS files (sha256 of the CA, certificate and
    key files; an unreadable file counts by its error): a reload compares it, since replacing the
    certificate and key under the same paths leaves the config unchanged while the TLS context
    built from the old files would keep presenting the old certificate."""
    if not cfg.tls:
        return ()
    out = []
    for name in (cfg.ca_file, cfg.cert_file, cfg.key_file):
        if not name:
            out.append(None)
            continue
        try:
            out.append(hashlib.sha256(Path(name).expanduser().read_bytes()).hexdigest())
        except OSError as exc:
            out.append(f"unreadable: {exc.strerror}")
    return tuple(out)


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
