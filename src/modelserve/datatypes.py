"""Tensor datatypes: the V2 wire names, their numpy dtypes and the BYTES wire encoding.

The V2 protocol names datatypes ``FP32``, ``BYTES``...; Triton's model configuration uses
``TYPE_FP32``, ``TYPE_STRING``... Both vocabularies map through this one table.
BYTES tensors are numpy ``object`` arrays holding ``bytes``.
"""

from __future__ import annotations

import math
import struct

import ml_dtypes
import numpy as np

from modelserve.errors import InvalidInput

BF16 = np.dtype(ml_dtypes.bfloat16)

#: V2 name -> numpy dtype
NUMPY_OF: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
    "BF16": BF16,
}
V2_OF: dict[np.dtype, str] = {dt: name for name, dt in NUMPY_OF.items()}
# numpy unicode/bytes arrays a user may hand us are BYTES too
V2_OF_KIND = {"U": "BYTES", "S": "BYTES", "O": "BYTES"}

#: V2 name -> model-config enum name (BYTES is TYPE_STRING there)
CONFIG_OF = {name: f"TYPE_{'STRING' if name == 'BYTES' else name}" for name in NUMPY_OF}
V2_OF_CONFIG = {v: k for k, v in CONFIG_OF.items()}

#: ONNX TensorProto element type -> V2 name
V2_OF_ONNX = {
    1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64",
    8: "BYTES", 9: "BOOL", 10: "FP16", 11: "FP64", 12: "UINT32", 13: "UINT64", 16: "BF16",
}


def v2_name(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    name = V2_OF.get(dtype) or V2_OF_KIND.get(dtype.kind)
    if name is None:
        raise InvalidInput(f"numpy dtype {dtype} has no V2 datatype")
    return name


def parse_datatype(name: str) -> str:
    """Accept either vocabulary (``FP32`` or ``TYPE_FP32``) and return the V2 name."""
    upper = name.upper()
    if upper in NUMPY_OF:
        return upper
    if upper in V2_OF_CONFIG:
        return V2_OF_CONFIG[upper]
    raise InvalidInput(f"unknown datatype '{name}'")


def element_size(datatype: str) -> int:
    return NUMPY_OF[datatype].itemsize


def encode_bytes(array: np.ndarray) -> bytes:
    """BYTES tensor -> wire form: each element as a 4-byte little-endian length then its bytes."""
    parts = []
    for item in array.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def decode_bytes(buffer: bytes | memoryview, count: int, name: str) -> np.ndarray:
    """Wire form -> flat object array of ``count`` bytes elements; errors name the input."""
    view = memoryview(buffer)
    out = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + 4 > len(view):
            raise InvalidInput(f"input '{name}': BYTES data ends inside element {i} of {count}")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise InvalidInput(f"input '{name}': BYTES element {i} claims {length} bytes, data is shorter")
        out[i] = bytes(view[offset:offset + length])
        offset += length
    if offset != len(view):
        raise InvalidInput(f"input '{name}': {len(view) - offset} bytes left over after {count} BYTES elements")
    return out


def to_wire(array: np.ndarray) -> bytes | memoryview:
    """Raw little-endian bytes of a tensor (no copy for contiguous numeric arrays)."""
    if array.dtype == object or array.dtype.kind in "US":
        return encode_bytes(array)
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return memoryview(array.reshape(-1).view(np.uint8)) if array.size else b""


def from_wire(buffer: bytes | memoryview, datatype: str, shape: list[int], name: str) -> np.ndarray:
    """Raw bytes -> array of ``shape``; checks the byte count against the shape."""
    count = math.prod(shape)
    if datatype == "BYTES":
        return reshape(decode_bytes(buffer, count, name), shape, name)
    dtype = NUMPY_OF[datatype]
    expected = count * dtype.itemsize
    if len(buffer) != expected:
        raise InvalidInput(
            f"input '{name}': got {len(buffer)} bytes of data, expected {expected} "
            f"for shape {list(shape)} of {datatype}"
        )
    return reshape(np.frombuffer(buffer, dtype=dtype), shape, name)


def from_json(data, datatype: str, shape: list[int], name: str) -> np.ndarray:
    """JSON ``data`` (flat or nested) -> array of ``shape``; checks the element count."""
    if datatype == "BF16":
        raise InvalidInput(f"input '{name}': BF16 cannot travel as JSON; send it as binary data")
    count = math.prod(shape)
    try:
        if datatype == "BYTES":
            flat = np.array(_flatten(data), dtype=object)
            for i, item in enumerate(flat):
                if isinstance(item, str):
                    flat[i] = item.encode()
                elif not isinstance(item, bytes):
                    raise InvalidInput(f"input '{name}': BYTES data must be strings, got {type(item).__name__}")
        else:
            flat = np.asarray(data, dtype=NUMPY_OF[datatype]).reshape(-1) if _is_regular(data) \
                else np.array(_flatten(data), dtype=NUMPY_OF[datatype])
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInput(f"input '{name}': data is not valid {datatype}: {exc}") from None
    if flat.size != count:
        raise InvalidInput(
            f"input '{name}': got {flat.size} elements of data, shape {list(shape)} needs {count}"
        )
    if datatype == "BOOL" and not all(isinstance(v, bool) for v in _flatten(data)):
        raise InvalidInput(f"input '{name}': BOOL data must be JSON true/false")
    return reshape(flat, shape, name)


def reshape(flat: np.ndarray, shape: list[int], name: str) -> np.ndarray:
    """``flat.reshape(shape)``; a shape numpy cannot hold even empty (a dimension past int64, or dimensions whose
    product overflows it beside a 0) is the request's error."""
    try:
        return flat.reshape(shape)
    except ValueError as exc:
        raise InvalidInput(f"input '{name}': shape {list(shape)} is too large: {exc}") from None


def _is_regular(data) -> bool:
    # a flat list of numbers is by far the common case; let numpy take it directly
    return isinstance(data, list) and (not data or not isinstance(data[0], list))


def _flatten(data) -> list:
    if not isinstance(data, list):
        return [data]
    out: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def to_json(array: np.ndarray) -> list:
    """Array -> flat JSON list (BYTES as UTF-8 strings)."""
    if array.dtype == BF16:
        raise InvalidInput("BF16 outputs cannot travel as JSON; request them as binary data")
    flat = array.reshape(-1)
    if array.dtype == object or array.dtype.kind in "US":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    return flat.tolist()
