"""Wire tensors and numpy arrays: the dtypes layerd takes, and the requests' tensor fields
serialized with each array copied once."""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import numpy as np

from .v1 import layerd_pb2 as pb

_DTYPES = {np.dtype(np.float32): pb.DTYPE_FLOAT32, np.dtype(np.float64): pb.DTYPE_FLOAT64,
           np.dtype(np.float16): pb.DTYPE_FLOAT16, np.dtype(np.int64): pb.DTYPE_INT64}
_NUMPY = {pb.DTYPE_FLOAT32: np.dtype("<f4"), pb.DTYPE_FLOAT64: np.dtype("<f8"), pb.DTYPE_FLOAT16: np.dtype("<f2"),
          pb.DTYPE_INT64: np.dtype("<i8")}
try:  # bfloat16 arrays come from ml_dtypes (which JAX and TensorFlow install), when present.
    import ml_dtypes

    _DTYPES[np.dtype(ml_dtypes.bfloat16)] = pb.DTYPE_BFLOAT16
    _NUMPY[pb.DTYPE_BFLOAT16] = np.dtype(ml_dtypes.bfloat16)
except ImportError:
    pass
#: The float dtypes a layer computes in or takes on the wire (half ones: float32 math).
_FLOATS = tuple(d for d in _DTYPES if d != np.dtype(np.int64))

Array = Union[np.ndarray, Sequence[float], float]


def _wire_array(array: Array) -> Tuple[int, Tuple[int, ...], np.ndarray]:
    """The wire dtype and shape of an array, and its elements as the wire has them: C order,
    little-endian (at least 1-d: numpy's contiguous copies are)."""
    a = np.asarray(array)
    if a.dtype not in _DTYPES:
        raise TypeError(f"layerd takes float32, float64, float16 and bfloat16 arrays (and int64 class "
                        f"ids as targets); got {a.dtype} (convert with .astype(np.float32) or np.float64)")
    return _DTYPES[a.dtype], a.shape, np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))


def to_tensor(array: Array) -> pb.Tensor:
    """A float32, float64, float16 or bfloat16 array (any shape), or int64 class ids, as a wire tensor:
    C order, little-endian."""
    dtype, shape, a = _wire_array(array)
    return pb.Tensor(dtype=dtype, shape=shape, data=a.tobytes())


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tensor_field(number: int, array: Array) -> list:
    """Field `number` of a message, holding `array` as a Tensor, as the pieces of its wire
    bytes; the elements are the array's own buffer, so joining the pieces copies them once
    (building a pb.Tensor, setting it in the request and serializing copy them three times)."""
    dtype, shape, a = _wire_array(array)
    head = pb.Tensor(dtype=dtype, shape=shape).SerializeToString()
    size = a.nbytes
    data_key = bytes([(3 << 3) | 2])  # Tensor.data: field 3, length-delimited
    body = len(head) + len(data_key) + len(_varint(size)) + size
    return [bytes([(number << 3) | 2]), _varint(body), head, data_key, _varint(size), a.reshape(-1).view(np.uint8)]


def _serialized(head, **tensors) -> bytes:
    """`head` (a request message without its tensors) serialized with `tensors` (field name:
    array, or None to leave the field unset), each array copied once (see _tensor_field): a call
    with a large tensor spends a good part of the client's time copying it."""
    fields = head.DESCRIPTOR.fields_by_name
    parts = [head.SerializeToString()]
    for name, array in tensors.items():
        if array is not None:
            parts += _tensor_field(fields[name].number, array)
    return b"".join(parts)


def from_tensor(tensor: pb.Tensor) -> np.ndarray:
    """A wire tensor as a new, writable numpy array of its dtype and shape."""
    if tensor.dtype not in _NUMPY:
        raise TypeError(f"a {pb.DType.Name(tensor.dtype)} tensor needs ml_dtypes for its numpy dtype "
                        "(pip install ml_dtypes)")
    return np.frombuffer(tensor.data, dtype=_NUMPY[tensor.dtype]).reshape(tuple(tensor.shape)).astype(
        _NUMPY[tensor.dtype].newbyteorder("="), copy=True)
