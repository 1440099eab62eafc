"""ed25519 signatures of deployed models (optional: needs the ``cryptography`` package).

What is signed is the DEPLOYMENT, not only the bytes: a canonical JSON document
(:func:`deployment_document`, :func:`canonical`) of everything in ``cmd/deploy`` that changes what
the model does or how it is checked: the model's sha256, its ``name``, its ``labels``, and the
sha256 of the ``sample`` image and of the ``golden_mask`` (null when absent). The request carries no
normalisation (the model's own metadata gives it, inside the signed bytes). Small enough to check
*before* a transfer starts (a bad signature costs the device no download); it binds the bytes
because the agent verifies the digest of what arrives, and a replay of a signed model with other
labels, name or sample no longer verifies. The store keeps the signed document with the signature,
so every later check (start-up, rollback, benchmark) verifies the same document.

Signatures of the raw digest alone (edge-agent before this scheme) are refused with one line
saying to re-sign with this version.

Keys are accepted as a PEM file (``openssl genpkey -algorithm ed25519``), or as the raw 32 bytes
in base64 (inline in the config, or in a file).  Everything raises :class:`SigningError` with
one readable line.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from typing import Any, Dict, List, Optional

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


SCHEME = "edge-agent/deploy-signature/2"
SIGNED_FIELDS = ("sha256", "name", "labels", "sample_sha256", "golden_mask_sha256")


def deployment_document(sha256_hex: str, name: str, labels: Optional[List[str]] = None,
                        sample: Optional[bytes] = None, golden_mask: Optional[bytes] = None) -> Dict[str, Any]:
    """The fields a deployment's signature covers (``SIGNED_FIELDS``); images by their sha256."""
    def digest(data: Optional[bytes]) -> Optional[str]:
        return hashlib.sha256(data).hexdigest() if data is not None else None

    return {"sha256": sha256_hex.lower(), "name": name, "labels": list(labels) if labels is not None else None,
            "sample_sha256": digest(sample), "golden_mask_sha256": digest(golden_mask)}


def canonical(document: Dict[str, Any]) -> bytes:
    """The bytes signed: sorted keys, no spaces, UTF-8, with the scheme's name."""
    fields = {k: document.get(k) for k in SIGNED_FIELDS}
    return json.dumps({"scheme": SCHEME, **fields}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def sign_deployment(private_key: Any, document: Dict[str, Any]) -> str:
    """base64 signature of :func:`canonical` (what ``cmd/deploy``'s ``signature`` field carries)."""
    return base64.b64encode(private_key.sign(canonical(document))).decode("ascii")


def verify_deployment(public_key: Any, document: Dict[str, Any], signature: bytes) -> None:
    """Raise SigningError (one line) unless ``signature`` signs ``document`` with ``public_key``."""
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(bytes(signature), canonical(document))
        return
    except (InvalidSignature, ValueError, TypeError):
        pass
    try:  # an old-style signature of the raw digest: say so, never accept it
        public_key.verify(bytes(signature), bytes.fromhex(str(document.get("sha256"))))
    except (InvalidSignature, ValueError, TypeError):
        raise SigningError("bad signature: it does not verify with deploy.public_key over the model's "
                           "sha256, name, labels and sample (changed since signing, or another key)") from None
    raise SigningError("the signature covers only the model's sha256 (an older edge-agent made it): re-sign "
                       "the deployment with this version (remote deploy --sign-key), which signs its name, "
                       "labels and sample too")
