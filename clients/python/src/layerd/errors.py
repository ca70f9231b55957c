"""Typed exceptions for layerd's gRPC statuses, with their google.rpc details."""
from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class LayerdError(Exception):
    """A failed layerd call.

    Attributes:
        code: the grpc.StatusCode.
        message: the server's message (names the field, the expected and the received value).
        reason: ErrorInfo.reason, stable for branching (e.g. "SESSION_NOT_FOUND"), or None.
        metadata: ErrorInfo.metadata (e.g. {"limit": "--max-sessions"}).
        violations: BadRequest field violations as (field, description) pairs.
    """

    code = grpc.StatusCode.UNKNOWN

    def __init__(self, code, message, reason=None, metadata=None, violations=()):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = dict(metadata or {})
        self.violations = list(violations)


class NotFound(LayerdError):
    """Unknown, closed or expired session; unknown layer."""


class AlreadyExists(LayerdError):
    """A session or layer with that id is live."""


class InvalidArgument(LayerdError):
    """A malformed request: bad id, unknown kind, bad tensor, dout mismatch, routing header."""


class FailedPrecondition(LayerdError):
    """Backward before any keeping Forward."""


class ResourceExhausted(LayerdError):
    """A server limit (sessions, layers, kept bytes, message size); metadata["limit"] names it."""


class DeadlineExceeded(LayerdError):
    """The call took longer than the client's deadline or the server's request timeout."""


class Unavailable(LayerdError):
    """The server cannot be reached, is shutting down, or shed the call under overload
    (reason "OVERLOADED": the call did not run; retry after a backoff)."""


class Unauthenticated(LayerdError):
    """No valid bearer token (reason "MISSING_TOKEN" or "INVALID_TOKEN")."""


_BY_CODE = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def from_rpc_error(error: grpc.RpcError) -> LayerdError:
    """The typed exception for a grpc.RpcError, with its details decoded."""
    code, message = error.code(), error.details()
    reason, metadata, violations = None, {}, []
    status = rpc_status.from_call(error) if isinstance(error, grpc.Call) else None
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [(v.field, v.description) for v in bad.field_violations]
    cls = _BY_CODE.get(code, LayerdError)
    return cls(code, message, reason, metadata, violations)
