"""Checkpoints: tensors and plain data only, written atomically, loaded with ``weights_only=True``.

A checkpoint rebuilds its model on its own: it holds the architecture name, the
labels, the preprocessing spec (the runtime's :class:`~tledge_runtime.model.meta.Preprocess`
as a dict), the run's config and metrics, and the tledge version. ``last.pt``
additionally holds what ``--resume`` needs (optimizer, schedule position, RNG states).
Loading never unpickles code: a file that needs it is refused.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from tledge.errors import CheckpointError, MetadataError
from tledge.models import Net, create_model
from tledge_runtime.fileio import atomic_write
from tledge_runtime.model.meta import Preprocess

FORMAT = "tledge.train.checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus the format tag) to ``path`` atomically."""
    body = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    return atomic_write(path, lambda f: torch.save(body, f))


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load and validate a tledge checkpoint; every failure is a one-line :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file", hint="pass runs/<name>/best.pt from `tledge finetune`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "global" in str(e).lower():
            raise CheckpointError(f"{path}: refused, the file would run code when loaded (it pickles Python objects)",
                                  hint="tledge loads only tensors and plain data; re-save the weights as a state dict") from None
        raise CheckpointError(f"{path}: corrupt checkpoint ({e})", hint="use last.pt or best.pt from a finished run") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__})",
                              hint="use another checkpoint of the run (best.pt / last.pt) or re-run finetune") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a tledge checkpoint",
                              hint="pass a best.pt/last.pt written by `tledge finetune`; raw weights go to --weights FILE")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {ckpt['format_version']} is newer than this tledge reads",
                              hint="upgrade tledge")
    for key in ("arch", "labels", "preprocess", "state_dict"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint lacks {key!r}", hint="re-run `tledge finetune`")
    return ckpt


def preprocess_of(ckpt: dict[str, Any]) -> Preprocess:
    try:
        return Preprocess.from_dict(ckpt["preprocess"])
    except MetadataError as e:
        raise CheckpointError(f"checkpoint preprocessing spec is invalid: {e.message}", hint="re-run `tledge finetune`") from None


def model_from_checkpoint(ckpt: dict[str, Any]) -> Net:
    """The checkpoint's model, weights loaded, in eval mode."""
    model = create_model(ckpt["arch"], len(ckpt["labels"]), weights="none", dropout=ckpt.get("config", {}).get("dropout", 0.0))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit {ckpt['arch']}: {str(e).splitlines()[0]}",
                              hint="the file is damaged or was edited; use another checkpoint") from None
    return model.eval()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
