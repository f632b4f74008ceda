"""``tledge export --sign-key KEY``: OpenSSF model-signing signatures over what an export wrote.

Signed, in this order (inner folders first, so the outer signature covers the inner ones):

1. each version folder of the Triton repository (``triton/<name>/<version>/model.sig``), over that folder's
   own files by relative path, so one version copied alone into a device's repository still verifies;
2. the export folder (``<out>/model.sig``), over every file in it: models, engines, report, the Triton
   repository with its configs and its version signatures.

Signing is OpenSSF ``model_signing`` in its private-key mode (elliptic-curve PEM key; offline, no
transparency log): the standard's own writer, so its verifier (``model_signing verify key``) and
tledge-runtime's (:mod:`tledge_runtime.repository.signature`) both read the result. The private key must be
mode 0600 (refused otherwise, as ssh refuses such keys); an encrypted key takes its password from
``TLEDGE_SIGN_KEY_PASSWORD``. The key's bytes are never printed, logged or written anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from tledge_export.errors import ExportError
from tledge_runtime.errors import TledgeError, first_line
from tledge_runtime.fileio import atomic_write
from tledge_runtime.repository.keys import SHORT, check_private_key_file
from tledge_runtime.repository.signature import BUNDLE_MEDIA_TYPE, MAX_SIGNATURE_BYTES, SIGNATURE_NAME

log = logging.getLogger(__name__)

PASSWORD_VARIABLE = "TLEDGE_SIGN_KEY_PASSWORD"
_INSTALL = "pip install 'tledge-export[signing]' (OpenSSF model-signing)"


def check_signing_key(key: str | os.PathLike) -> None:
    """Before any export work: the key file's permissions and the signing library (errors say how to fix)."""
    try:
        check_private_key_file(key)
    except TledgeError as e:
        raise ExportError(e.message, hint=e.hint) from None
    _model_signing()


def sign_folder(folder: Path, key: str | os.PathLike) -> str:
    """Write ``folder/model.sig`` over every file of ``folder`` (atomically); returns the key's fingerprint."""
    ms = _model_signing()
    check_signing_key(key)
    password = os.environ.get(PASSWORD_VARIABLE) or None
    hashing = ms.hashing.Config().use_file_serialization(hashing_algorithm="sha256").set_ignored_paths(
        paths=[SIGNATURE_NAME], ignore_git_paths=False)
    with tempfile.TemporaryDirectory(prefix="tledge-sign-") as tmp:
        out = Path(tmp) / SIGNATURE_NAME
        try:
            config = ms.signing.Config().use_elliptic_key_signer(private_key=key, password=password)
            config.set_hashing_config(hashing).sign(folder, out)
        except (ValueError, TypeError, OSError) as e:
            # cryptography and model_signing describe a bad key or a link in the folder; never the key's bytes.
            raise ExportError(f"cannot sign {folder}: {first_line(e)}",
                              hint="use an unencrypted EC key (or set " + PASSWORD_VARIABLE + ") and a folder "
                                   "without links") from None
        data = out.read_bytes()
    atomic_write(folder / SIGNATURE_NAME, data)
    hint = json.loads(data)["verificationMaterial"]["publicKey"]["hint"]
    log.info("signed %s with key %s", folder, hint[:SHORT])
    return hint


def sign_export(out: Path, key: str | os.PathLike, triton: Path | None = None) -> str:
    """Sign every version folder of ``triton`` (if any), then ``out`` itself; returns the key's fingerprint."""
    for folder in version_folders(triton):
        sign_folder(folder, key)
    return sign_folder(out, key)


def remove_stale_signatures(out: Path, triton: Path | None = None) -> None:
    """An export without --sign-key leaves no signature of an earlier export behind (it would no longer verify
    and would say the folder is signed). Only a file that is a model-signing bundle is removed."""
    for folder in [*version_folders(triton), out]:
        path = folder / SIGNATURE_NAME
        if _is_bundle(path):
            path.unlink()
            log.warning("removed %s from an earlier signed export: this export is not signed", path)


def version_folders(triton: Path | None) -> list[Path]:
    """``<triton>/<name>/<version>/`` folders (numeric versions, as Triton reads them)."""
    if triton is None or not triton.is_dir():
        return []
    return sorted(v for m in triton.iterdir() if m.is_dir() and not m.is_symlink()
                  for v in m.iterdir() if v.name.isdigit() and v.is_dir() and not v.is_symlink())


def _is_bundle(path: Path) -> bool:
    if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_SIGNATURE_BYTES:
        return False
    try:
        return json.loads(path.read_bytes()).get("mediaType") == BUNDLE_MEDIA_TYPE
    except (ValueError, AttributeError, OSError):
        return False


def _model_signing() -> Any:
    try:
        import model_signing.hashing
        import model_signing.signing

        return model_signing
    except ImportError as e:  # model-signing 1.1 imports pyOpenSSL without declaring it: name what is missing
        raise ExportError(f"--sign-key needs {e.name or 'model_signing'}, which is not installed", hint=_INSTALL) \
            from None
