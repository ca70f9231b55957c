"""layerd: a numpy-friendly client for the layerd neural-network layer service.

    import layerd, numpy as np
    client = layerd.Client("127.0.0.1:50051")
    with client.session(idle_timeout=60) as s:
        relu = s.layer("relu")
        y = relu.forward(np.array([1.5, -2.0], dtype=np.float32))
        dx = relu.backward(np.ones(2, dtype=np.float32))
"""
from .client import AFTER_STEPS_HEADER, SESSION_HEADER, Client, Layer, Optimizer, Retry, Session, from_tensor, load, save, to_tensor
from .tuning import tune_malloc
from .errors import (AlreadyExists, DeadlineExceeded, FailedPrecondition, InvalidArgument, LayerdError, NotFound,
                     ResourceExhausted, Unauthenticated, Unavailable)

__all__ = ["Client", "Session", "Layer", "Optimizer", "save", "load", "Retry", "to_tensor", "from_tensor", "tune_malloc",
           "SESSION_HEADER", "AFTER_STEPS_HEADER", "LayerdError", "NotFound",
           "AlreadyExists", "InvalidArgument", "FailedPrecondition", "ResourceExhausted", "DeadlineExceeded",
           "Unavailable", "Unauthenticated"]
__version__ = "0.1.0"
