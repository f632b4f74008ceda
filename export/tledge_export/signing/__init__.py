"""Signing what an export wrote (``tledge export --sign-key``): see :mod:`tledge_export.signing.sign`."""

from tledge_export.signing.sign import check_signing_key, remove_stale_signatures, sign_export, sign_folder

__all__ = ["check_signing_key", "remove_stale_signatures", "sign_export", "sign_folder"]
