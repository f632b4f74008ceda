"""The exported files themselves: names, embedded metadata, validity checks and atomic writes.

Every ONNX file carries its :class:`~tledge_runtime.model.meta.ModelMeta` as JSON in
``metadata_props[ONNX_KEY]``, the same document an engine file carries in its header, so
the runtime needs the file and nothing else. Files are written with
:func:`tledge_runtime.fileio.atomic_write`: a crash mid-export leaves the previous file or
the new one, never a torn one.

An export folder may hold the user's own files: tledge replaces or removes a model file
only when that file says tledge export wrote it (:func:`written_by_tledge`: the ONNX
producer stamp, or the engine header), never anything else under the same name.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from tledge_export.config import FILE_NAMES, REPORT_NAME  # noqa: F401 - re-exported: the names of the files written here
from tledge_export.errors import ExportError
from tledge_export.version import __version__
from tledge_runtime.backends.engine_file import MAGIC as ENGINE_MAGIC
from tledge_runtime.backends.loader import meta_from_props
from tledge_runtime.errors import first_line
from tledge_runtime.fileio import atomic_write
from tledge_runtime.model.meta import ONNX_KEY, ModelMeta

log = logging.getLogger(__name__)

PRODUCER = "tledge-export"  # ModelProto.producer_name of every ONNX file tledge writes


def engine_name(onnx_format: str, flavour: str) -> str:
    """``model.fp16.engine`` (TensorRT) or ``model.fp16.rtx.engine`` (TensorRT for RTX)."""
    precision = onnx_format.split("-")[0]
    return f"model.{precision}.rtx.engine" if flavour == "tensorrt-rtx" else f"model.{precision}.engine"


def embed_meta(model: onnx.ModelProto, meta: ModelMeta) -> onnx.ModelProto:
    """Put ``meta`` into ``model.metadata_props`` (replacing an older tledge entry) and stamp the producer."""
    keep = [(p.key, p.value) for p in model.metadata_props if p.key != ONNX_KEY]
    del model.metadata_props[:]
    for key, value in keep + [(ONNX_KEY, meta.to_json())]:
        model.metadata_props.add(key=key, value=value)
    model.producer_name = PRODUCER
    model.producer_version = __version__
    return model


def read_meta(model: onnx.ModelProto | str | Path) -> ModelMeta:
    """The tledge metadata of an ONNX model (a proto or a file), through the runtime's one reader."""
    where = "the ONNX model" if isinstance(model, onnx.ModelProto) else str(model)
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return meta_from_props({p.key: p.value for p in model.metadata_props}, where)


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset the graph is written against."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def prune_opsets(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop opset imports of domains no node uses.

    ONNX Runtime's quantization pre-processing saves its optimized graph with every
    domain ORT knows (com.microsoft, nchwc, ...); other consumers need not see them.
    """
    used = {n.domain for n in model.graph.node} | {""}
    keep = [(o.domain, o.version) for o in model.opset_import if o.domain in used or o.domain == "ai.onnx"]
    del model.opset_import[:]
    for domain, version in keep:
        model.opset_import.add(domain=domain, version=version)
    return model


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every node a unique name: quantization excludes nodes by name, reports list them by name."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    return model


def check(model: onnx.ModelProto, what: str) -> None:
    """``onnx.checker`` with ``full_check`` (strict shape inference too); an invalid graph is an ExportError."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"the {what} ONNX graph fails onnx.checker: {first_line(e)}",
                          hint="report this with the model architecture; try another --opset") from None


def write_file(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (readable like any file the user creates; see fileio)."""
    return atomic_write(path, data)


def refuse_links(base: Path, path: Path) -> None:
    """Refuse to write ``path`` when ``base`` or any component from it down to ``path`` is a link: a link planted
    in an export folder would send tledge's writes (or its folder creation) somewhere else."""
    current = base
    for part in (None, *path.relative_to(base).parts):
        current = current if part is None else current / part
        if current.is_symlink():
            raise ExportError(f"{current}: is a link; tledge export does not write through links",
                              hint="remove the link, or export to another --out folder")


def save_onnx(model: onnx.ModelProto, path: Path) -> Path:
    """Serialize ``model`` to ``path`` atomically (nothing half-written survives a crash).

    A file already at ``path`` is replaced only if tledge export wrote it: anything else is the user's.
    """
    if (path.exists() or path.is_symlink()) and not written_by_tledge(path):
        raise ExportError(f"{path}: exists and was not written by tledge export; it is left as it is",
                          hint="move that file away, or export to another --out folder")
    data = model.SerializeToString()
    write_file(path, data)
    log.debug("wrote %s (%.1f MB)", path, len(data) / 1e6)  # the export step says it once, with its numbers
    return path


def remove_stale(path: Path) -> None:
    """Remove a file an earlier export left under the name of a format that failed now,
    so the folder never shows an old model next to a report that says this one failed.
    A file tledge export did not write (the user's own, or a link) is left alone."""
    if not (path.exists() or path.is_symlink()):
        return
    if written_by_tledge(path):
        path.unlink()
        log.warning("removed %s from an earlier export: this export of that format failed", path)
    else:
        log.warning("left %s alone: this export of that format failed, and that file is not one tledge wrote", path)


def written_by_tledge(path: Path) -> bool:
    """True for a regular file (not a link) that tledge export wrote: an ONNX model whose producer is
    ``tledge-export``, or a tledge engine file. Reads the first bytes only."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    return head.startswith(ENGINE_MAGIC) or _onnx_producer(head) == PRODUCER.encode()


def _onnx_producer(head: bytes) -> bytes | None:
    """``producer_name`` from the first bytes of a serialized ModelProto (protobuf writes fields in number
    order: ir_version (1, varint), then producer_name (2, bytes)); None when they are not there."""
    i = 0
    while i < len(head):
        tag, i = _varint(head, i)
        if tag is None:
            return None
        field, wire = tag >> 3, tag & 7
        if field == 1 and wire == 0:  # ir_version
            _, i = _varint(head, i)
            if i is None:
                return None
        elif field == 2 and wire == 2:  # producer_name
            n, i = _varint(head, i)
            return head[i:i + n] if n is not None and i + n <= len(head) else None
        else:
            return None
    return None


def _varint(data: bytes, i: int) -> tuple:
    """Decode a protobuf varint at ``data[i]``: ``(value, next index)``, or ``(None, None)`` when cut off."""
    value = shift = 0
    while i < len(data) and shift < 64:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            return value, i
        shift += 7
    return None, None
