"""Key files of signed models: the public keys a device trusts, and the rule for the private key an export signs with.

Keys are elliptic-curve keys in PEM (P-256, P-384 or P-521: the curves OpenSSF model-signing accepts), made
for instance with ``openssl ecparam -name prime256v1 -genkey -noout -out fleet.key`` and
``openssl ec -in fleet.key -pubout -out fleet.pub``. A key is named by its **fingerprint**: the SHA-256 of
its public key in PEM (SubjectPublicKeyInfo), which is the ``publicKey.hint`` model-signing writes into
every signature, so a signature says which key made it before any cryptography runs.

Nothing here prints, logs or returns the bytes of a private key; error messages name the file only.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tledge_runtime.errors import TledgeError, import_optional

MAX_KEY_BYTES = 64 * 1024  # a PEM EC key is a few hundred bytes; a bigger "key file" is not one
SHORT = 16  # hex digits of a fingerprint shown to people (64 bits: enough to tell keys apart)
_HASHES = {"secp256r1": "SHA256", "secp384r1": "SHA384", "secp521r1": "SHA512"}  # as model-signing pairs them
_INSTALL = "pip install 'tledge-runtime[signing]' (the cryptography package)"


@dataclass(frozen=True)
class TrustedKey:
    """A public key this device accepts signatures from."""

    path: str
    fingerprint: str  # hex SHA-256 of the PEM public key
    key: Any  # cryptography's EllipticCurvePublicKey

    @property
    def short(self) -> str:
        return self.fingerprint[:SHORT]

    def verifies(self, signature: bytes, data: bytes) -> bool:
        """Whether ``signature`` (DER ECDSA) over ``data`` was made by this key's private half."""
        crypto = _crypto()
        try:
            self.key.verify(signature, data, crypto.ec.ECDSA(getattr(crypto.hashes, _HASHES[self.key.curve.name])()))
        except (crypto.InvalidSignature, ValueError):
            return False
        return True


def load_trusted_keys(paths: Iterable[str | os.PathLike | TrustedKey]) -> tuple[TrustedKey, ...]:
    """The public keys in ``paths`` (PEM files, or keys loaded already), each a supported elliptic-curve key."""
    keys = tuple(p if isinstance(p, TrustedKey) else load_public_key(p) for p in paths)
    if not keys:
        raise TledgeError("no trusted key given", hint="pass the public key of the key that signs your models")
    return keys


def load_public_key(path: str | os.PathLike) -> TrustedKey:
    crypto = _crypto()
    data = _read_key_file(Path(path), "public key")
    try:
        key = crypto.serialization.load_pem_public_key(data)
    except (ValueError, TypeError, crypto.UnsupportedAlgorithm):
        raise TledgeError(f"{path}: not a PEM public key",
                          hint="export it with `openssl ec -in KEY -pubout -out KEY.pub`") from None
    _check_curve(key, path)
    return TrustedKey(str(path), fingerprint_of(key), key)


def fingerprint_of(public_key: Any) -> str:
    """model-signing's key hint: hex SHA-256 of the public key as PEM SubjectPublicKeyInfo."""
    s = _crypto().serialization
    pem = public_key.public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def check_private_key_file(path: str | os.PathLike) -> Path:
    """Refuse a private key file that others can read, as ssh does; returns the path.

    A signing key readable by the group or by everyone has leaked already: anyone on the machine could
    sign a model every device trusts. The file must be a regular file of this user (or root), mode
    0600 or stricter.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise TledgeError(f"{path}: cannot read the signing key ({e.strerror or e})",
                          hint="pass the private key file the fleet's public key belongs to") from None
    if not stat.S_ISREG(st.st_mode):
        raise TledgeError(f"{path}: the signing key is not a regular file", hint="pass the private key file")
    if st.st_mode & 0o077:
        raise TledgeError(f"{path}: the signing key is readable or writable by others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}); refused, as ssh refuses such keys",
                          hint=f"chmod 600 {path}, and replace the key if others may have copied it")
    if st.st_uid not in (os.getuid(), 0):
        raise TledgeError(f"{path}: the signing key belongs to another user (uid {st.st_uid})",
                          hint="sign with a key file you own, mode 0600")
    return path


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_BYTES + 1)
    except OSError as e:
        raise TledgeError(f"{path}: cannot read the {what} ({e.strerror or e})", hint="check the path") from None
    if len(data) > MAX_KEY_BYTES:
        raise TledgeError(f"{path}: over {MAX_KEY_BYTES} bytes, not a {what}", hint="pass a PEM key file")
    return data


def _check_curve(public_key: Any, path: str | os.PathLike) -> None:
    ec = _crypto().ec
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name not in _HASHES:
        raise TledgeError(f"{path}: not a P-256, P-384 or P-521 elliptic-curve key",
                          hint="OpenSSF model-signing's private-key mode uses these curves; make a key with "
                               "`openssl ecparam -name prime256v1 -genkey -noout -out KEY`")


class _Crypto:
    """The parts of ``cryptography`` used here, imported once, on first use (an optional extra)."""

    def __init__(self) -> None:
        base = "tledge-runtime needs {missing} to verify signed models"
        import_optional("cryptography", TledgeError, base, _INSTALL)
        from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        self.InvalidSignature, self.UnsupportedAlgorithm = InvalidSignature, UnsupportedAlgorithm
        self.hashes, self.serialization, self.ec = hashes, serialization, ec


_loaded: list[_Crypto] = []


def _crypto() -> _Crypto:
    if not _loaded:
        _loaded.append(_Crypto())
    return _loaded[0]
