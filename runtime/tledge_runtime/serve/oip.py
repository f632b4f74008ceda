"""The Open Inference Protocol (v2, REST) on the wire: inference requests in, responses out, numpy in between.

JSON tensors (``"data"``: flat or nested lists) and Triton's binary tensor data extension: a body
of ``Inference-Header-Content-Length`` bytes of JSON followed by the raw tensors, each input
announcing its size in ``parameters.binary_data_size`` (tritonclient sends numpy inputs this way
by default). BYTES tensors travel as 4-byte little-endian lengths followed by the bytes. Every
size the client states is checked against the bytes actually there before anything is allocated.
Pure numpy: no web framework here, so the codec is tested on its own.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from tledge_runtime.errors import TledgeError

NUMPY_TYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}
MAX_DIMS = 8
HEADER_LENGTH = "Inference-Header-Content-Length"


class ProtocolError(TledgeError):
    """A request that does not follow the protocol, or asks for what the model does not have; ``status``: HTTP code."""

    def __init__(self, message: str, hint: str | None = None, status: int = 400):
        super().__init__(message, hint)
        self.status = status


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    array: np.ndarray  # an object array of bytes for BYTES


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool | None  # None: the request's default
    classification: int  # 0: the tensor itself; k: the k best classes as "score:index:label" strings


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: tuple[Tensor, ...]
    outputs: tuple[RequestedOutput, ...] | None  # None: every output
    binary_output: bool  # the request's ``binary_data_output`` parameter


def parse_infer_request(body: bytes | bytearray, header_length: str | None) -> InferRequest:
    """Decode an inference request body; ``header_length``: the Inference-Header-Content-Length header, if sent."""
    if header_length is None:
        header, binary = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH} {header_length!r} is not an integer", "send the JSON header's length") from None
        if not 0 < n <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {n} does not fit a body of {len(body)} bytes",
                                "send the JSON header's length in bytes")
        view = memoryview(body)  # the binary tensors are read where they lie, not copied out first
        header, binary = bytes(view[:n]), view[n:]
    try:
        doc = json.loads(header)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"the inference request is not valid JSON ({e})", "send an Open Inference Protocol request") from None
    _expect(isinstance(doc, dict), "the inference request must be a JSON object")
    inputs = doc.get("inputs")
    _expect(isinstance(inputs, list) and inputs, "the request needs a non-empty 'inputs' list")
    offset = 0
    tensors = []
    for item in inputs:
        tensor, offset = _input(item, binary, offset)
        tensors.append(tensor)
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data are not claimed by any input",
                            "give every binary input its parameters.binary_data_size")
    params = _params(doc, "request")
    outputs = doc.get("outputs")
    requested = None
    if outputs is not None:
        _expect(isinstance(outputs, list), "'outputs' must be a list")
        requested = tuple(_requested(o) for o in outputs)
    request_id = doc.get("id")
    _expect(request_id is None or isinstance(request_id, str), "'id' must be a string")
    return InferRequest(request_id, tuple(tensors), requested, bool(params.get("binary_data_output", False)))


def encode_infer_response(model: str, request: InferRequest, outputs: list[Tensor],
                          version: str = "1") -> tuple[bytes, int | None]:
    """The response body (``model_version``: the version that computed it), and the JSON header's length when
    binary tensors follow it (else None)."""
    wanted = {o.name: o for o in request.outputs} if request.outputs is not None else {}
    entries, blobs = [], []
    for out in outputs:
        binary = wanted[out.name].binary if out.name in wanted else None
        binary = request.binary_output if binary is None else binary
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": list(out.array.shape)}
        if binary:
            blob = _to_bytes(out)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _to_json(out)
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": entries}
    if request.id is not None:
        doc["id"] = request.id
    header = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def classification(scores: np.ndarray, labels: tuple[str, ...], k: int) -> np.ndarray:
    """Triton's classification extension: the ``k`` best classes of each row as ``b"score:index:label"``."""
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    out = np.empty((len(scores), k), dtype=np.object_)
    for i, row in enumerate(order):
        for j, c in enumerate(row):
            out[i, j] = f"{float(scores[i, c]):f}:{int(c)}:{labels[c]}".encode()
    return out


# ----------------------------------------------------------------------------- decoding


def _input(item: Any, binary: bytes | memoryview, offset: int) -> tuple[Tensor, int]:
    _expect(isinstance(item, dict), "each input must be a JSON object")
    name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
    _expect(isinstance(name, str) and name, "each input needs a 'name'")
    _expect(datatype in NUMPY_TYPES, f"input {name!r}: unknown datatype {datatype!r}",
            f"use one of {', '.join(NUMPY_TYPES)}")
    _expect(isinstance(shape, list) and len(shape) <= MAX_DIMS
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape),
            f"input {name!r}: 'shape' must be a list of at most {MAX_DIMS} non-negative integers")
    count = math.prod(shape)
    params = _params(item, f"input {name!r}")
    size = params.get("binary_data_size")
    if size is not None:
        _expect(isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= len(binary) - offset,
                f"input {name!r}: binary_data_size {size!r} runs past the {len(binary)} bytes of binary data")
        raw = binary[offset:offset + size]
        array = _bytes_tensor(raw, count, name) if datatype == "BYTES" else _fixed_tensor(raw, datatype, count, name)
        return Tensor(name, datatype, array.reshape(shape)), offset + size
    _expect("data" in item, f"input {name!r} has neither 'data' nor parameters.binary_data_size")
    return Tensor(name, datatype, _json_tensor(item["data"], datatype, shape, count, name)), offset


def _fixed_tensor(raw: bytes | memoryview, datatype: str, count: int, name: str) -> np.ndarray:
    dtype = np.dtype(NUMPY_TYPES[datatype]).newbyteorder("<")
    _expect(len(raw) == count * dtype.itemsize,
            f"input {name!r}: {len(raw)} bytes of binary data, its shape needs {count * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)


def _bytes_tensor(raw: bytes | memoryview, count: int, name: str) -> np.ndarray:
    out = np.empty(count, dtype=np.object_)
    pos = 0
    for i in range(count):
        _expect(pos + 4 <= len(raw), f"input {name!r}: BYTES data ends before element {i}")
        (n,) = struct.unpack_from("<I", raw, pos)
        _expect(pos + 4 + n <= len(raw), f"input {name!r}: BYTES element {i} claims {n} bytes, fewer are there")
        out[i] = bytes(raw[pos + 4:pos + 4 + n])
        pos += 4 + n
    _expect(pos == len(raw), f"input {name!r}: {len(raw) - pos} bytes left after its {count} BYTES elements")
    return out


def _json_tensor(data: Any, datatype: str, shape: list, count: int, name: str) -> np.ndarray:
    flat = list(_flatten(data)) if isinstance(data, list) else None
    _expect(flat is not None and len(flat) == count,
            f"input {name!r}: 'data' holds {len(flat) if flat is not None else 'no list of'} values, "
            f"its shape {shape} needs {count}")
    if datatype == "BYTES":
        _expect(all(isinstance(v, str) for v in flat), f"input {name!r}: BYTES data must be strings",
                "send binary data (tritonclient: binary_data=True) for encoded images")
        array = np.empty(count, dtype=np.object_)
        array[:] = [v.encode("utf-8") for v in flat]
        return array.reshape(shape)
    _expect(all(isinstance(v, (int, float)) for v in flat), f"input {name!r}: 'data' must hold numbers")
    try:
        with np.errstate(over="raise", invalid="raise"):
            return np.asarray(flat, dtype=NUMPY_TYPES[datatype]).reshape(shape)
    except (OverflowError, ValueError, FloatingPointError) as e:
        raise ProtocolError(f"input {name!r}: a value does not fit {datatype} ({e})", "check the data") from None


def _flatten(data: list) -> Any:
    for v in data:
        if isinstance(v, list):
            yield from _flatten(v)
        else:
            yield v


def _requested(item: Any) -> RequestedOutput:
    _expect(isinstance(item, dict) and isinstance(item.get("name"), str), "each requested output needs a 'name'")
    params = _params(item, f"output {item['name']!r}")
    binary = params.get("binary_data")
    k = params.get("classification", 0)
    _expect(binary is None or isinstance(binary, bool), f"output {item['name']!r}: binary_data must be true or false")
    _expect(isinstance(k, int) and not isinstance(k, bool) and k >= 0,
            f"output {item['name']!r}: classification must be a non-negative integer")
    return RequestedOutput(item["name"], binary, k)


def _params(doc: dict, what: str) -> dict:
    params = doc.get("parameters", {})
    _expect(isinstance(params, dict), f"{what}: 'parameters' must be a JSON object")
    return params


def _expect(ok: bool, message: str, hint: str = "see the Open Inference Protocol (v2) REST specification") -> None:
    if not ok:
        raise ProtocolError(message, hint)


# ----------------------------------------------------------------------------- encoding


def _to_bytes(t: Tensor) -> bytes:
    if t.datatype == "BYTES":
        parts = []
        for v in t.array.reshape(-1):
            b = v if isinstance(v, bytes) else str(v).encode("utf-8")
            parts += [struct.pack("<I", len(b)), b]
        return b"".join(parts)
    return np.ascontiguousarray(t.array, dtype=np.dtype(NUMPY_TYPES[t.datatype]).newbyteorder("<")).tobytes()


def _to_json(t: Tensor) -> list:
    flat = t.array.reshape(-1)
    if t.datatype == "BYTES":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    return flat.tolist()
