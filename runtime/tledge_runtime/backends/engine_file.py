"""The tledge TensorRT engine file: a small header with the model metadata, then the engine.

A serialized TensorRT engine has no room for our metadata, and a sidecar file gets
lost on the way to a device, so tledge writes ``*.engine`` files as::

    b"TLEDGE-TRT\\0\\1"   12-byte magic (format version 1 in the last byte)
    uint32 little-endian  length N of the JSON document
    N bytes               ModelMeta JSON (utf-8), the same document ONNX files carry
    rest                  the serialized engine, byte for byte as TensorRT produced it

The runtime strips the header and hands the rest to ``deserialize_cuda_engine``.
``tledge-runtime info`` can show the metadata of an engine without TensorRT installed, and
reads only the header to do it (:func:`read_engine_meta`): an engine file may be gigabytes.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

from tledge_runtime.errors import MetadataError, ModelError
from tledge_runtime.fileio import PathLike, atomic_write
from tledge_runtime.model.meta import MAX_METADATA_BYTES, ModelMeta

MAGIC = b"TLEDGE-TRT\x00\x01"
_LEN = struct.Struct("<I")


def write_engine(path: PathLike, meta: ModelMeta, engine: bytes) -> Path:
    """Write ``engine`` (serialized TensorRT plan bytes) with ``meta`` in front, atomically. A file already at
    ``path`` is replaced only if it is a tledge engine: anything else is someone else's."""
    if (Path(path).exists() or Path(path).is_symlink()) and (Path(path).is_symlink() or not is_engine_file(path)):
        raise ModelError(f"{path}: exists and is not a tledge engine; it is left as it is",
                         hint="move that file away, or write the engine elsewhere")
    doc = meta.to_json().encode("utf-8")
    return atomic_write(path, MAGIC + _LEN.pack(len(doc)) + doc + bytes(engine))


def is_engine_file(path: PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def read_engine_meta(path: PathLike) -> ModelMeta:
    """The metadata of a tledge engine file: reads the header only (a few KB), whatever the file's size."""
    with _open(path) as f:
        return _read_header(f, Path(path))[0]


def read_engine(path: PathLike) -> tuple[ModelMeta, bytes]:
    """Return ``(metadata, serialized engine bytes)`` of a tledge engine file.

    The header is read and checked first; the engine body is read only when the header is sound.
    """
    path = Path(path)
    with _open(path) as f:
        meta, body_size = _read_header(f, path)
        if body_size == 0:
            raise ModelError(f"{path}: engine file holds metadata but no engine", hint="re-export the engine")
        engine = f.read()
    return meta, engine


def _open(path: PathLike) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as e:
        raise ModelError(f"{path}: cannot be read ({e.strerror or e})", hint="check the path") from None


def _read_header(f: BinaryIO, path: Path) -> tuple[ModelMeta, int]:
    """Parse magic, length and metadata from the start of ``f``; returns the metadata and the engine's size in bytes."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(len(MAGIC) + _LEN.size)
    if not head.startswith(MAGIC):
        raise MetadataError(f"{path}: not a tledge engine file (no tledge header)",
                            hint="build engines with `tledge export --engine`; raw trtexec plans carry no labels")
    if len(head) < len(MAGIC) + _LEN.size:
        raise MetadataError(f"{path}: engine header is truncated", hint="re-export the engine")
    (n,) = _LEN.unpack_from(head, len(MAGIC))
    start = len(head)
    # The length comes from the file: check it against the cap and the file's size before reading that much.
    if n > MAX_METADATA_BYTES or start + n > size:
        raise MetadataError(f"{path}: engine header declares {n} bytes of metadata, file is too short or corrupt",
                            hint="re-export the engine")
    doc = f.read(n)
    if len(doc) != n:
        raise MetadataError(f"{path}: engine header is truncated", hint="re-export the engine")
    try:
        meta = ModelMeta.from_json(doc)
    except MetadataError as e:
        raise MetadataError(f"{path}: {e.message}", hint=e.hint) from None
    return meta, size - start - n
