"""Verify a signed model folder on the device: OpenSSF model-signing's format, checked with ``cryptography`` alone.

``tledge export --sign-key`` signs with OpenSSF model-signing (``model_signing``, private-key mode): each
signed folder gets ``model.sig``, a Sigstore bundle (v0.3) holding a DSSE envelope whose payload is an
in-toto statement listing every file of the folder by relative path with its SHA-256, signed with ECDSA.
The device reads the same file with this module instead of the ``model_signing`` package: that package
pulls in the Sigstore client stack (about 70 MB and 40 packages on top of the runtime's 186 MB, 0.5 s to
import, and in 1.1.1 an undeclared dependency on pyOpenSSL), where verifying a key signature needs only
ECDSA and SHA-256 (``cryptography``, 16 MB). The tests check both ways that this module and
``model_signing`` agree, on good and on altered folders.

Every byte of the folder is hostile until verified: the signature file is bounded (1 MiB) before it is
parsed, every path it lists must be relative and inside the folder, links are never followed
(:mod:`tledge_runtime.repository.folder`), and a refusal is one line naming the file that differs or the
key that signed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tledge_runtime.errors import ModelError, SignatureError
from tledge_runtime.repository.folder import MAX_FILES, Snapshot, sha256_file, snapshot
from tledge_runtime.repository.keys import SHORT, TrustedKey

SIGNATURE_NAME = "model.sig"  # model-signing's customary name; one per signed folder
MAX_SIGNATURE_BYTES = 1 << 20
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
MAX_IGNORED = 64
_SIGN_HINT = "sign the folder with `tledge export --sign-key KEY`"


@dataclass(frozen=True)
class Verified:
    """A folder whose every file matched a signature made by a trusted key."""

    folder: Path
    key: TrustedKey
    files: tuple[str, ...]  # the signed files, relative paths
    snapshot: Snapshot  # the folder as it was verified

    def to_dict(self) -> dict[str, Any]:
        return {"verified": True, "key": self.key.short, "files": len(self.files)}

    def unchanged(self) -> bool:
        """Whether the folder's files are still the ones verified (same inodes, sizes and change times)."""
        try:
            return snapshot(self.folder).identity == self.snapshot.identity
        except ModelError:
            return False


@dataclass(frozen=True)
class _Bundle:
    hint: str | None  # the signer's key fingerprint, as the bundle states it
    payload: bytes
    signature: bytes


def verify_folder(folder: str | os.PathLike, keys: Sequence[TrustedKey]) -> Verified:
    """Check ``folder`` against its ``model.sig``: signed by one of ``keys``, every file present and unchanged,
    no file the signature does not cover. Raises :class:`SignatureError` naming the file or key otherwise."""
    folder = Path(folder)
    try:
        snap = snapshot(folder)
    except ModelError as e:
        raise SignatureError(f"{folder}: {e.message}", hint=e.hint) from None
    bundle = _read_bundle(folder)
    key = _signer(folder, bundle, keys)
    signed, ignored = _statement(folder, bundle.payload)
    _compare(folder, snap, signed, ignored)
    return Verified(folder, key, tuple(sorted(signed)), snap)


def verify_model_file(path: str | os.PathLike, keys: Sequence[TrustedKey]) -> Verified:
    """Verify the folder holding the model file ``path`` (an export folder or a repository's version folder)."""
    path = Path(path)
    verified = verify_folder(path.parent, keys)
    if path.name not in verified.files:
        raise SignatureError(f"{path}: not among the files the signature covers", hint=_SIGN_HINT)
    return verified


def verify_path(path: str | os.PathLike, keys: Sequence[TrustedKey]) -> Verified:
    """:func:`verify_folder` for a folder, :func:`verify_model_file` for a file (``tledge-runtime verify PATH``)."""
    return verify_folder(path, keys) if Path(path).is_dir() else verify_model_file(path, keys)


def signature_status(folder: str | os.PathLike, verified: Verified | None) -> dict[str, Any] | str:
    """What ``/info`` and the repository index say about a model's signature: the verified key, or "unverified"
    (signed, but no trusted key was given to check it), or "unsigned"."""
    if verified is not None:
        return verified.to_dict()
    return "unverified" if os.path.lexists(Path(folder) / SIGNATURE_NAME) else "unsigned"


def pae(payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding of an in-toto payload: what the ECDSA signature covers."""
    return b"DSSEv1 %d %s %d %s" % (len(PAYLOAD_TYPE), PAYLOAD_TYPE.encode(), len(payload), payload)


def signer_hint(folder: str | os.PathLike) -> str | None:
    """The fingerprint of the key a folder's ``model.sig`` says signed it (unverified), or None."""
    try:
        return _read_bundle(Path(folder)).hint
    except SignatureError:
        return None


# ----------------------------------------------------------------------------- the signature file


def _read_bundle(folder: Path) -> _Bundle:
    path = folder / SIGNATURE_NAME
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise SignatureError(f"{folder}: unsigned (no {SIGNATURE_NAME})", hint=_SIGN_HINT) from None
    except OSError as e:
        raise SignatureError(f"{path}: cannot read ({e.strerror or e})", hint=_SIGN_HINT) from None
    if not stat.S_ISREG(st.st_mode):
        raise SignatureError(f"{path}: not a regular file (links are not followed)", hint=_SIGN_HINT)
    if st.st_size > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{path}: {st.st_size} bytes, more than the {MAX_SIGNATURE_BYTES} a signature may have",
                             hint=_SIGN_HINT)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        raw = f.read(MAX_SIGNATURE_BYTES + 1)
    doc = _json(raw, path)
    envelope = _field(doc, "dsseEnvelope", dict, path)
    _expect(doc.get("mediaType") == BUNDLE_MEDIA_TYPE, path, f"not a Sigstore bundle v0.3 ({BUNDLE_MEDIA_TYPE})")
    _expect(envelope.get("payloadType") == PAYLOAD_TYPE, path, "the envelope does not hold an in-toto statement")
    signatures = _field(envelope, "signatures", list, path)
    _expect(len(signatures) == 1 and isinstance(signatures[0], dict), path, "expected exactly one signature")
    material = doc.get("verificationMaterial")
    hint = material.get("publicKey", {}).get("hint") if isinstance(material, dict) and \
        isinstance(material.get("publicKey"), dict) else None
    _expect(hint is None or (isinstance(hint, str) and len(hint) == 64 and _is_hex(hint)), path,
            "the key hint is not a SHA-256 fingerprint")
    return _Bundle(hint, _b64(envelope.get("payload"), path), _b64(signatures[0].get("sig"), path))


def _signer(folder: Path, bundle: _Bundle, keys: Sequence[TrustedKey]) -> TrustedKey:
    """The trusted key whose signature this is: the one the bundle names, else any that verifies."""
    data = pae(bundle.payload)
    if bundle.hint is not None:
        key = next((k for k in keys if k.fingerprint == bundle.hint), None)
        if key is None:
            raise SignatureError(f"{folder}: signed by key {bundle.hint[:SHORT]}, which is not trusted here "
                                 f"(trusted: {', '.join(k.short for k in keys)})",
                                 hint="pass that key's public key with --trusted-key if you trust it")
        if not key.verifies(bundle.signature, data):
            raise SignatureError(f"{folder}/{SIGNATURE_NAME}: the signature does not verify with key {key.short}: "
                                 "the signed manifest was altered", hint="re-sign the folder")
        return key
    for key in keys:  # bundles older than model-signing 1.0 name no key
        if key.verifies(bundle.signature, data):
            return key
    raise SignatureError(f"{folder}/{SIGNATURE_NAME}: no trusted key verifies the signature "
                         f"(trusted: {', '.join(k.short for k in keys)})", hint="re-sign the folder with a trusted key")


def _statement(folder: Path, payload: bytes) -> tuple[dict[str, str], tuple[str, ...]]:
    """The signed files (relative path -> hex SHA-256) and the paths the signer left out on purpose."""
    where = folder / SIGNATURE_NAME
    doc = _json(payload, where)
    _expect(doc.get("_type") == STATEMENT_TYPE and doc.get("predicateType") == PREDICATE_TYPE, where,
            "not a model-signing statement")
    predicate = _field(doc, "predicate", dict, where)
    serialization = _field(predicate, "serialization", dict, where)
    _expect(serialization.get("method") == "files" and serialization.get("hash_type") == "sha256", where,
            "signed with a serialization tledge does not verify (it reads per-file sha256 manifests)")
    ignored = serialization.get("ignore_paths", [])
    _expect(isinstance(ignored, list) and len(ignored) <= MAX_IGNORED and all(_safe(p) for p in ignored), where,
            "bad ignore_paths")
    resources = _field(predicate, "resources", list, where)
    _expect(len(resources) <= MAX_FILES, where, f"lists more than {MAX_FILES} files")
    signed: dict[str, str] = {}
    for r in resources:
        _expect(isinstance(r, dict) and _safe(r.get("name")) and r.get("algorithm") == "sha256"
                and isinstance(r.get("digest"), str) and len(r["digest"]) == 64 and _is_hex(r["digest"])
                and r["name"] not in signed, where, "a listed file has a bad name or digest")
        signed[r["name"]] = r["digest"].lower()
    subject = doc.get("subject")
    root = hashlib.sha256(b"".join(bytes.fromhex(d) for d in signed.values())).hexdigest()
    _expect(isinstance(subject, list) and len(subject) == 1 and isinstance(subject[0], dict)
            and isinstance(subject[0].get("digest"), dict) and subject[0]["digest"].get("sha256") == root, where,
            "the statement's subject digest does not match its files")
    return signed, tuple(ignored)


def _compare(folder: Path, snap: Snapshot, signed: dict[str, str], ignored: tuple[str, ...]) -> None:
    def skipped(rel: str) -> bool:
        return rel == SIGNATURE_NAME or any(rel == p.rstrip("/") or rel.startswith(p.rstrip("/") + "/")
                                            for p in ignored)

    present = {f.rel: f for f in snap.files if not skipped(f.rel)}
    extra = sorted(set(present) - set(signed))
    missing = sorted(set(signed) - set(present))
    if extra:
        raise SignatureError(f"{folder}: {extra[0]} is not covered by the signature{_more(extra)}",
                             hint="remove files added after signing, or re-sign the folder")
    if missing:
        raise SignatureError(f"{folder}: {missing[0]} is signed but missing{_more(missing)}",
                             hint="copy the whole folder; wait until the copy is complete")
    for rel in sorted(signed, key=lambda r: present[r].size):  # small files first: a wrong config fails fast
        try:
            digest = sha256_file(folder / rel, present[rel].size)
        except ModelError as e:
            raise SignatureError(e.message, hint=e.hint) from None
        if digest != signed[rel]:
            raise SignatureError(f"{folder}: {rel} differs from the signed file (sha256 {digest[:SHORT]}, signed "
                                 f"{signed[rel][:SHORT]})", hint="the file was altered or truncated; copy it again")


# ----------------------------------------------------------------------------- small parsers


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def _json(raw: bytes, where: Path) -> dict:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise SignatureError(f"{where}: not a signature (unreadable JSON)", hint=_SIGN_HINT) from None
    _expect(isinstance(doc, dict), where, "not a JSON object")
    return doc


def _field(doc: dict, name: str, kind: type, where: Path) -> Any:
    value = doc.get(name)
    _expect(isinstance(value, kind), where, f"no {name!r}")
    return value


def _b64(text: Any, where: Path) -> bytes:
    _expect(isinstance(text, str), where, "a base64 field is missing")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{where}: not a signature (bad base64)", hint=_SIGN_HINT) from None


def _safe(name: Any) -> bool:
    """A relative POSIX path that stays inside the folder."""
    if not isinstance(name, str) or not name or len(name) > 1024 or "\x00" in name or "\\" in name:
        return False
    p = PurePosixPath(name)
    return not p.is_absolute() and all(part not in ("", ".", "..") for part in p.parts)


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


def _expect(ok: bool, where: Path, what: str) -> None:
    if not ok:
        raise SignatureError(f"{where}: not a valid model signature ({what})", hint=_SIGN_HINT)
