"""ed25519 signatures of deployed models (optional: needs the ``cryptography`` package).

What is signed is the model's raw 32-byte sha256 digest: small enough to check *before* a
transfer starts (a bad signature costs the device no download), and it binds the signature to
the exact bytes because the agent verifies the digest of what arrives.

Keys are accepted as a PEM file (``openssl genpkey -algorithm ed25519``), or as the raw 32 bytes
in base64 (inline in the config, or in a file).  Everything raises :class:`SigningError` with
one readable line.
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import Any

from edge_agent.errors import EdgeAgentError

INSTALL_HINT = "pip install 'edge-agent[deploy-signing]' (the 'cryptography' package)"


class SigningError(EdgeAgentError):
    """A key or signature is unusable, or the signing library is missing."""


def available() -> bool:
    try:
        import cryptography.hazmat.primitives.asymmetric.ed25519  # noqa: F401
    except ImportError:
        return False
    return True


def _ed25519() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SigningError(f"ed25519 signatures need the 'cryptography' package: {INSTALL_HINT}") from None
    return ed25519


def _key_material(spec: str, what: str) -> bytes:
    """The bytes of a key given as a file path or inline base64."""
    spec = spec.strip()
    if os.path.isfile(spec):
        try:
            with open(spec, "rb") as fh:
                return fh.read()
        except OSError as exc:
            raise SigningError(f"cannot read the {what} {spec}: {exc.strerror}") from exc
    return spec.encode("ascii", "replace")


def _raw_or_pem(material: bytes, what: str) -> Any:
    """Either ('pem', bytes) or ('raw', 32 bytes)."""
    if b"-----BEGIN" in material:
        return "pem", material
    try:
        raw = base64.b64decode(material.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SigningError(f"the {what} is neither a PEM file nor base64") from None
    if len(raw) != 32:
        raise SigningError(f"the {what} decodes to {len(raw)} bytes; an ed25519 key has 32")
    return "raw", raw


def load_public_key(spec: str) -> Any:
    """``deploy.public_key`` (PEM file, base64 file, or inline base64) as a verifier object."""
    ed25519 = _ed25519()
    from cryptography.hazmat.primitives import serialization

    kind, data = _raw_or_pem(_key_material(spec, "deploy.public_key"), "deploy.public_key")
    if kind == "raw":
        return ed25519.Ed25519PublicKey.from_public_bytes(data)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise SigningError(f"deploy.public_key: not a readable PEM public key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SigningError("deploy.public_key: not an ed25519 key")
    return key


def load_private_key(spec: str) -> Any:
    """A signing key (PEM file, or base64 of the 32-byte seed) for ``remote deploy --sign-key``."""
    ed25519 = _ed25519()
    from cryptography.hazmat.primitives import serialization

    kind, data = _raw_or_pem(_key_material(spec, "signing key"), "signing key")
    if kind == "raw":
        return ed25519.Ed25519PrivateKey.from_private_bytes(data)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"signing key: not a readable unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SigningError("signing key: not an ed25519 key")
    return key


def public_key_base64(private_key: Any) -> str:
    """The base64 public key to put in ``deploy.public_key`` for a signing key."""
    from cryptography.hazmat.primitives import serialization

    raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def sign_digest(private_key: Any, sha256_hex: str) -> str:
    """base64 signature of the raw digest (what ``cmd/deploy``'s ``signature`` field carries)."""
    return base64.b64encode(private_key.sign(bytes.fromhex(sha256_hex))).decode("ascii")


def verify_digest(public_key: Any, sha256_hex: str, signature: bytes) -> None:
    """Raise SigningError unless ``signature`` signs ``sha256_hex`` with ``public_key``."""
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(bytes(signature), bytes.fromhex(sha256_hex))
    except (InvalidSignature, ValueError, TypeError):
        raise SigningError("bad signature: it does not verify with deploy.public_key") from None
