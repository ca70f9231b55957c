from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("session_id", "idle_timeout_seconds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    idle_timeout_seconds: int
    def __init__(self, session_id: _Optional[str] = ..., idle_timeout_seconds: _Optional[int] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("session_id", "idle_timeout_seconds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    idle_timeout_seconds: int
    def __init__(self, session_id: _Optional[str] = ..., idle_timeout_seconds: _Optional[int] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CreateLayerRequest(_message.Message):
    __slots__ = ("session_id", "layer_id", "kind")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    layer_id: str
    kind: str
    def __init__(self, session_id: _Optional[str] = ..., layer_id: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

class CreateLayerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("session_id", "layer_id", "x", "no_grad")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_ID_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    NO_GRAD_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    layer_id: str
    x: Tensor
    no_grad: bool
    def __init__(self, session_id: _Optional[str] = ..., layer_id: _Optional[str] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., no_grad: _Optional[bool] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("y",)
    Y_FIELD_NUMBER: _ClassVar[int]
    y: Tensor
    def __init__(self, y: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("session_id", "layer_id", "dout")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_ID_FIELD_NUMBER: _ClassVar[int]
    DOUT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    layer_id: str
    dout: Tensor
    def __init__(self, session_id: _Optional[str] = ..., layer_id: _Optional[str] = ..., dout: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class BackwardResponse(_message.Message):
    __slots__ = ("dx",)
    DX_FIELD_NUMBER: _ClassVar[int]
    dx: Tensor
    def __init__(self, dx: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class RunRequest(_message.Message):
    __slots__ = ("forward", "backward")
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_FIELD_NUMBER: _ClassVar[int]
    forward: ForwardRequest
    backward: BackwardRequest
    def __init__(self, forward: _Optional[_Union[ForwardRequest, _Mapping]] = ..., backward: _Optional[_Union[BackwardRequest, _Mapping]] = ...) -> None: ...

class RunResponse(_message.Message):
    __slots__ = ("forward", "backward")
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_FIELD_NUMBER: _ClassVar[int]
    forward: ForwardResponse
    backward: BackwardResponse
    def __init__(self, forward: _Optional[_Union[ForwardResponse, _Mapping]] = ..., backward: _Optional[_Union[BackwardResponse, _Mapping]] = ...) -> None: ...

class ListLayerKindsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListLayerKindsResponse(_message.Message):
    __slots__ = ("kinds",)
    KINDS_FIELD_NUMBER: _ClassVar[int]
    kinds: _containers.RepeatedCompositeFieldContainer[LayerKind]
    def __init__(self, kinds: _Optional[_Iterable[_Union[LayerKind, _Mapping]]] = ...) -> None: ...

class LayerKind(_message.Message):
    __slots__ = ("name", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...
