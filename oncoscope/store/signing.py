"""Ed25519 signatures on backup manifests and audit checkpoints.

A checksum or hash chain without a key is recomputed by whoever edits the data, so it proves
nothing about who wrote it. A keyed MAC (HMAC) would need its secret everywhere a signature is
checked: a backup host or a restore machine could then forge archives. An Ed25519 signature is
made with a private key that never leaves the application host (``<home>/signing_key``, mode
0600, created on first use; or the file named by ``ONCOSCOPE_SIGNING_KEY``) and checked with the
public key alone (``signing_key.pub`` beside it), which may be copied anywhere.

A signature is stored as ``{"algorithm": "ed25519", "key_id": ..., "signature": base64}``. The
signed message starts with a purpose label, so a signature made for one kind of document never
verifies as another. ``key_id`` (the start of the public key's SHA-256) only names the key in
error messages; it is not trusted.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "ed25519"


class SignatureError(Exception):
    """A key cannot be read, or a signature is missing or was not made by the trusted key."""


def public_path(private: Path) -> Path:
    return Path(private).with_name(Path(private).name + ".pub")


def signing_key(path: Path) -> Ed25519PrivateKey:
    """The instance's private key; created (with ``<path>.pub``) the first time it is needed."""
    path = Path(path)
    if not path.exists():
        _create(path)
    return _load(path, private=True)


def _create(path: Path) -> None:
    try:
        _write_new_key(path)
    except OSError as exc:  # e.g. ONCOSCOPE_SIGNING_KEY in a folder the service account cannot write
        raise SignatureError(
            f"cannot create the signing key {path} ({exc}). Make {path.parent} writable by the "
            "account that runs oncoscope, or set ONCOSCOPE_SIGNING_KEY to a writable path (or to the instance's "
            "existing key)") from None


def _write_new_key(path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)  # atomic and refuses to replace: two first uses keep one key, never half a file
        public_path(path).write_bytes(public_pem(key.public_key()))
    except FileExistsError:
        pass  # another process created the key first: that one is used
    finally:
        tmp.unlink()


def _load(path: Path, private: bool):
    try:
        data = Path(path).read_bytes()
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"cannot read the {'signing' if private else 'public'} key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey if private else Ed25519PublicKey):
        raise SignatureError(f"{path} is not an Ed25519 {'private' if private else 'public'} key")
    return key


def trusted_key(trusted: Path | None, signing: Path) -> Ed25519PublicKey:
    """The key signatures must come from: the named public key file, else this instance's own.
    Never creates a key: one made now cannot have signed anything."""
    if trusted:
        return _load(trusted, private=False)
    if Path(signing).exists():
        return _load(signing, private=True).public_key()
    raise SignatureError(f"no trusted public key: this instance has no signing key ({signing}). Copy "
                         "signing_key.pub from the instance that made the signatures (`oncoscope public-key` "
                         "prints it) and name it with ONCOSCOPE_TRUSTED_KEY or --trusted-key")


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _message(purpose: str, data: bytes) -> bytes:
    return f"oncoscope {purpose} v1\n".encode() + data


def sign(key: Ed25519PrivateKey, purpose: str, data: bytes) -> dict:
    return {"algorithm": ALGORITHM, "key_id": key_id(key.public_key()),
            "signature": base64.b64encode(key.sign(_message(purpose, data))).decode()}


def digest(sig: dict) -> str:
    """SHA-256 of a signature's bytes (not of its base64 text, which has more than one spelling): what a
    later signed document names to chain itself to this one."""
    return hashlib.sha256(base64.b64decode(sig["signature"], validate=True)).hexdigest()


def check(key: Ed25519PublicKey, purpose: str, data: bytes, sig, what: str) -> None:
    """Raise ``SignatureError`` unless ``sig`` is ``key``'s signature of ``data`` for ``purpose``."""
    if not isinstance(sig, dict) or not isinstance(sig.get("signature"), str):
        raise SignatureError(f"{what} is not signed (made by an older oncoscope, or the signature was removed); "
                             "only data signed by the trusted key is accepted")
    if sig.get("algorithm") != ALGORITHM:
        raise SignatureError(f"{what} is signed with {sig.get('algorithm')!r}, not {ALGORITHM}")
    try:
        key.verify(base64.b64decode(sig["signature"], validate=True), _message(purpose, data))
    except (InvalidSignature, ValueError):  # (a bad base64 text is a ValueError too)
        theirs, ours = sig.get("key_id"), key_id(key)
        why = (f"it was signed by another key ({theirs}; the trusted key is {ours})" if theirs != ours
               else "it was changed after it was signed")
        raise SignatureError(f"{what} fails its signature check: {why}") from None
