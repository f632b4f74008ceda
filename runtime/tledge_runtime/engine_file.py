"""The tledge TensorRT engine file: a small header with the model metadata, then the engine.

A serialized TensorRT engine has no room for our metadata, and a sidecar file gets
lost on the way to a device, so tledge writes ``*.engine`` files as::

    b"TLEDGE-TRT\\0\\1"   12-byte magic (format version 1 in the last byte)
    uint32 little-endian  length N of the JSON document
    N bytes               ModelMeta JSON (utf-8), the same document ONNX files carry
    rest                  the serialized engine, byte for byte as TensorRT produced it

The runtime strips the header and hands the rest to ``deserialize_cuda_engine``.
``tledge-runtime info`` can show the metadata of an engine without TensorRT installed.
"""

from __future__ import annotations

import struct
from pathlib import Path

from .errors import MetadataError, ModelError
from .fileio import PathLike, atomic_write
from .meta import MAX_METADATA_BYTES, ModelMeta

MAGIC = b"TLEDGE-TRT\x00\x01"
_LEN = struct.Struct("<I")


def write_engine(path: PathLike, meta: ModelMeta, engine: bytes) -> Path:
    """Write ``engine`` (serialized TensorRT plan bytes) with ``meta`` in front, atomically."""
    doc = meta.to_json().encode("utf-8")
    return atomic_write(path, MAGIC + _LEN.pack(len(doc)) + doc + bytes(engine))


def is_engine_file(path: PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def read_engine(path: PathLike) -> tuple[ModelMeta, bytes]:
    """Return ``(metadata, serialized engine bytes)`` of a tledge engine file."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise ModelError(f"{path}: cannot be read ({e.strerror or e})", hint="check the path") from None
    if not blob.startswith(MAGIC):
        raise MetadataError(f"{path}: not a tledge engine file (no tledge header)",
                            hint="build engines with `tledge export --engine`; raw trtexec plans carry no labels")
    start = len(MAGIC) + _LEN.size
    if len(blob) < start:
        raise MetadataError(f"{path}: engine header is truncated", hint="re-export the engine")
    (n,) = _LEN.unpack_from(blob, len(MAGIC))
    if n > MAX_METADATA_BYTES or start + n > len(blob):
        raise MetadataError(f"{path}: engine header declares {n} bytes of metadata, file is too short or corrupt",
                            hint="re-export the engine")
    meta = ModelMeta.from_json(blob[start:start + n])
    engine = blob[start + n:]
    if not engine:
        raise ModelError(f"{path}: engine file holds metadata but no engine", hint="re-export the engine")
    return meta, engine
