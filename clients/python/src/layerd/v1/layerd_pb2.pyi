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
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType
DTYPE_INT64: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType

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

class DescribeSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DescribeSessionResponse(_message.Message):
    __slots__ = ("session_id", "idle_timeout_seconds", "layers", "optimizers", "held_bytes", "replica_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZERS_FIELD_NUMBER: _ClassVar[int]
    HELD_BYTES_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    idle_timeout_seconds: int
    layers: _containers.RepeatedCompositeFieldContainer[LayerSummary]
    optimizers: _containers.RepeatedCompositeFieldContainer[OptimizerSummary]
    held_bytes: int
    replica_id: str
    def __init__(self, session_id: _Optional[str] = ..., idle_timeout_seconds: _Optional[int] = ..., layers: _Optional[_Iterable[_Union[LayerSummary, _Mapping]]] = ..., optimizers: _Optional[_Iterable[_Union[OptimizerSummary, _Mapping]]] = ..., held_bytes: _Optional[int] = ..., replica_id: _Optional[str] = ...) -> None: ...

class LayerSummary(_message.Message):
    __slots__ = ("layer_id", "kind", "dtype", "optimizer_id")
    LAYER_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_ID_FIELD_NUMBER: _ClassVar[int]
    layer_id: str
    kind: str
    dtype: DType
    optimizer_id: str
    def __init__(self, layer_id: _Optional[str] = ..., kind: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., optimizer_id: _Optional[str] = ...) -> None: ...

class OptimizerSummary(_message.Message):
    __slots__ = ("optimizer_id", "algorithm", "steps", "layer_ids", "stored_steps")
    OPTIMIZER_ID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LAYER_IDS_FIELD_NUMBER: _ClassVar[int]
    STORED_STEPS_FIELD_NUMBER: _ClassVar[int]
    optimizer_id: str
    algorithm: str
    steps: int
    layer_ids: _containers.RepeatedScalarFieldContainer[str]
    stored_steps: int
    def __init__(self, optimizer_id: _Optional[str] = ..., algorithm: _Optional[str] = ..., steps: _Optional[int] = ..., layer_ids: _Optional[_Iterable[str]] = ..., stored_steps: _Optional[int] = ...) -> None: ...

class CreateLayerRequest(_message.Message):
    __slots__ = ("session_id", "layer_id", "kind", "config", "params", "dtype")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    layer_id: str
    kind: str
    config: LayerConfig
    params: _containers.MessageMap[str, Tensor]
    dtype: DType
    def __init__(self, session_id: _Optional[str] = ..., layer_id: _Optional[str] = ..., kind: _Optional[str] = ..., config: _Optional[_Union[LayerConfig, _Mapping]] = ..., params: _Optional[_Mapping[str, Tensor]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class CreateLayerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("session_id", "layer_id", "x", "no_grad", "t", "eval")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_ID_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    NO_GRAD_FIELD_NUMBER: _ClassVar[int]
    T_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    layer_id: str
    x: Tensor
    no_grad: bool
    t: Tensor
    eval: bool
    def __init__(self, session_id: _Optional[str] = ..., layer_id: _Optional[str] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., no_grad: _Optional[bool] = ..., t: _Optional[_Union[Tensor, _Mapping]] = ..., eval: _Optional[bool] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("y",)
    Y_FIELD_NUMBER: _ClassVar[int]
    y: Tensor
    def __init__(self, y: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("session_id", "layer_id", "dout", "return_grads")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_ID_FIELD_NUMBER: _ClassVar[int]
    DOUT_FIELD_NUMBER: _ClassVar[int]
    RETURN_GRADS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    layer_id: str
    dout: Tensor
    return_grads: bool
    def __init__(self, session_id: _Optional[str] = ..., layer_id: _Optional[str] = ..., dout: _Optional[_Union[Tensor, _Mapping]] = ..., return_grads: _Optional[bool] = ...) -> None: ...

class BackwardResponse(_message.Message):
    __slots__ = ("dx", "grads")
    class GradsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    DX_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    dx: Tensor
    grads: _containers.MessageMap[str, Tensor]
    def __init__(self, dx: _Optional[_Union[Tensor, _Mapping]] = ..., grads: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

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

class LayerConfig(_message.Message):
    __slots__ = ("affine", "dropout", "batch_norm", "convolution", "pooling", "sequential")
    AFFINE_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    BATCH_NORM_FIELD_NUMBER: _ClassVar[int]
    CONVOLUTION_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    SEQUENTIAL_FIELD_NUMBER: _ClassVar[int]
    affine: AffineConfig
    dropout: DropoutConfig
    batch_norm: BatchNormConfig
    convolution: ConvolutionConfig
    pooling: PoolingConfig
    sequential: SequentialConfig
    def __init__(self, affine: _Optional[_Union[AffineConfig, _Mapping]] = ..., dropout: _Optional[_Union[DropoutConfig, _Mapping]] = ..., batch_norm: _Optional[_Union[BatchNormConfig, _Mapping]] = ..., convolution: _Optional[_Union[ConvolutionConfig, _Mapping]] = ..., pooling: _Optional[_Union[PoolingConfig, _Mapping]] = ..., sequential: _Optional[_Union[SequentialConfig, _Mapping]] = ...) -> None: ...

class Init(_message.Message):
    __slots__ = ("method", "std", "seed")
    class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        METHOD_UNSPECIFIED: _ClassVar[Init.Method]
        HE: _ClassVar[Init.Method]
        XAVIER: _ClassVar[Init.Method]
        NORMAL: _ClassVar[Init.Method]
    METHOD_UNSPECIFIED: Init.Method
    HE: Init.Method
    XAVIER: Init.Method
    NORMAL: Init.Method
    METHOD_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    method: Init.Method
    std: float
    seed: int
    def __init__(self, method: _Optional[_Union[Init.Method, str]] = ..., std: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class AffineConfig(_message.Message):
    __slots__ = ("in_features", "out_features", "init")
    IN_FEATURES_FIELD_NUMBER: _ClassVar[int]
    OUT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    in_features: int
    out_features: int
    init: Init
    def __init__(self, in_features: _Optional[int] = ..., out_features: _Optional[int] = ..., init: _Optional[_Union[Init, _Mapping]] = ...) -> None: ...

class DropoutConfig(_message.Message):
    __slots__ = ("ratio", "seed")
    RATIO_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ratio: float
    seed: int
    def __init__(self, ratio: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class BatchNormConfig(_message.Message):
    __slots__ = ("num_features", "momentum", "epsilon")
    NUM_FEATURES_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    num_features: int
    momentum: float
    epsilon: float
    def __init__(self, num_features: _Optional[int] = ..., momentum: _Optional[float] = ..., epsilon: _Optional[float] = ...) -> None: ...

class ConvolutionConfig(_message.Message):
    __slots__ = ("in_channels", "out_channels", "kernel_h", "kernel_w", "stride", "pad", "init")
    IN_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    OUT_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    KERNEL_H_FIELD_NUMBER: _ClassVar[int]
    KERNEL_W_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    PAD_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    in_channels: int
    out_channels: int
    kernel_h: int
    kernel_w: int
    stride: int
    pad: int
    init: Init
    def __init__(self, in_channels: _Optional[int] = ..., out_channels: _Optional[int] = ..., kernel_h: _Optional[int] = ..., kernel_w: _Optional[int] = ..., stride: _Optional[int] = ..., pad: _Optional[int] = ..., init: _Optional[_Union[Init, _Mapping]] = ...) -> None: ...

class PoolingConfig(_message.Message):
    __slots__ = ("pool_h", "pool_w", "stride", "pad")
    POOL_H_FIELD_NUMBER: _ClassVar[int]
    POOL_W_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    PAD_FIELD_NUMBER: _ClassVar[int]
    pool_h: int
    pool_w: int
    stride: int
    pad: int
    def __init__(self, pool_h: _Optional[int] = ..., pool_w: _Optional[int] = ..., stride: _Optional[int] = ..., pad: _Optional[int] = ...) -> None: ...

class SequentialConfig(_message.Message):
    __slots__ = ("layers",)
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[LayerSpec]
    def __init__(self, layers: _Optional[_Iterable[_Union[LayerSpec, _Mapping]]] = ...) -> None: ...

class LayerSpec(_message.Message):
    __slots__ = ("name", "kind", "config", "params")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    config: LayerConfig
    params: _containers.MessageMap[str, Tensor]
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., config: _Optional[_Union[LayerConfig, _Mapping]] = ..., params: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class GetParamsRequest(_message.Message):
    __slots__ = ("session_id", "layer_id", "include_grads")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_GRADS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    layer_id: str
    include_grads: bool
    def __init__(self, session_id: _Optional[str] = ..., layer_id: _Optional[str] = ..., include_grads: _Optional[bool] = ...) -> None: ...

class GetParamsResponse(_message.Message):
    __slots__ = ("params", "buffers", "grads")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    class BuffersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    class GradsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    params: _containers.MessageMap[str, Tensor]
    buffers: _containers.MessageMap[str, Tensor]
    grads: _containers.MessageMap[str, Tensor]
    def __init__(self, params: _Optional[_Mapping[str, Tensor]] = ..., buffers: _Optional[_Mapping[str, Tensor]] = ..., grads: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class SetParamsRequest(_message.Message):
    __slots__ = ("session_id", "layer_id", "values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_ID_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    layer_id: str
    values: _containers.MessageMap[str, Tensor]
    def __init__(self, session_id: _Optional[str] = ..., layer_id: _Optional[str] = ..., values: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class SetParamsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CreateOptimizerRequest(_message.Message):
    __slots__ = ("session_id", "optimizer_id", "layer_ids", "sgd", "momentum", "adagrad", "adam")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_IDS_FIELD_NUMBER: _ClassVar[int]
    SGD_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    ADAGRAD_FIELD_NUMBER: _ClassVar[int]
    ADAM_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    optimizer_id: str
    layer_ids: _containers.RepeatedScalarFieldContainer[str]
    sgd: Sgd
    momentum: Momentum
    adagrad: AdaGrad
    adam: Adam
    def __init__(self, session_id: _Optional[str] = ..., optimizer_id: _Optional[str] = ..., layer_ids: _Optional[_Iterable[str]] = ..., sgd: _Optional[_Union[Sgd, _Mapping]] = ..., momentum: _Optional[_Union[Momentum, _Mapping]] = ..., adagrad: _Optional[_Union[AdaGrad, _Mapping]] = ..., adam: _Optional[_Union[Adam, _Mapping]] = ...) -> None: ...

class Sgd(_message.Message):
    __slots__ = ("lr",)
    LR_FIELD_NUMBER: _ClassVar[int]
    lr: float
    def __init__(self, lr: _Optional[float] = ...) -> None: ...

class Momentum(_message.Message):
    __slots__ = ("lr", "momentum")
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    lr: float
    momentum: float
    def __init__(self, lr: _Optional[float] = ..., momentum: _Optional[float] = ...) -> None: ...

class AdaGrad(_message.Message):
    __slots__ = ("lr",)
    LR_FIELD_NUMBER: _ClassVar[int]
    lr: float
    def __init__(self, lr: _Optional[float] = ...) -> None: ...

class Adam(_message.Message):
    __slots__ = ("lr", "beta1", "beta2")
    LR_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    lr: float
    beta1: float
    beta2: float
    def __init__(self, lr: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ...) -> None: ...

class CreateOptimizerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("session_id", "optimizer_id", "expected_step")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_STEP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    optimizer_id: str
    expected_step: int
    def __init__(self, session_id: _Optional[str] = ..., optimizer_id: _Optional[str] = ..., expected_step: _Optional[int] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("steps",)
    STEPS_FIELD_NUMBER: _ClassVar[int]
    steps: int
    def __init__(self, steps: _Optional[int] = ...) -> None: ...

class TrainStepRequest(_message.Message):
    __slots__ = ("session_id", "layer_id", "optimizer_id", "x", "t", "return_dx", "return_scores", "expected_step")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_ID_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    T_FIELD_NUMBER: _ClassVar[int]
    RETURN_DX_FIELD_NUMBER: _ClassVar[int]
    RETURN_SCORES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_STEP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    layer_id: str
    optimizer_id: str
    x: Tensor
    t: Tensor
    return_dx: bool
    return_scores: bool
    expected_step: int
    def __init__(self, session_id: _Optional[str] = ..., layer_id: _Optional[str] = ..., optimizer_id: _Optional[str] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., t: _Optional[_Union[Tensor, _Mapping]] = ..., return_dx: _Optional[bool] = ..., return_scores: _Optional[bool] = ..., expected_step: _Optional[int] = ...) -> None: ...

class TrainStepResponse(_message.Message):
    __slots__ = ("loss", "dx", "scores", "steps")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    DX_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    loss: float
    dx: Tensor
    scores: Tensor
    steps: int
    def __init__(self, loss: _Optional[float] = ..., dx: _Optional[_Union[Tensor, _Mapping]] = ..., scores: _Optional[_Union[Tensor, _Mapping]] = ..., steps: _Optional[int] = ...) -> None: ...

class ExportSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ExportSessionResponse(_message.Message):
    __slots__ = ("safetensors",)
    SAFETENSORS_FIELD_NUMBER: _ClassVar[int]
    safetensors: bytes
    def __init__(self, safetensors: _Optional[bytes] = ...) -> None: ...

class ImportSessionRequest(_message.Message):
    __slots__ = ("session_id", "idle_timeout_seconds", "safetensors")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SAFETENSORS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    idle_timeout_seconds: int
    safetensors: bytes
    def __init__(self, session_id: _Optional[str] = ..., idle_timeout_seconds: _Optional[int] = ..., safetensors: _Optional[bytes] = ...) -> None: ...

class ImportSessionResponse(_message.Message):
    __slots__ = ("session_id", "idle_timeout_seconds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    idle_timeout_seconds: int
    def __init__(self, session_id: _Optional[str] = ..., idle_timeout_seconds: _Optional[int] = ...) -> None: ...
