"""The one error module: a closed set of error kinds and their gRPC status codes.

Services raise `StrataError(kind, message)`; `to_status_code` is the only place a kind
becomes a gRPC code (as Triton's CodeToStatus). Clients turn a peer's `grpc.RpcError`
back into a `StrataError` with `from_rpc_error`, naming the peer.
"""

from __future__ import annotations

import enum
import functools
import logging
from typing import TYPE_CHECKING, Callable, TypeVar

if TYPE_CHECKING:  # grpc is imported where codes are made, so torch-free policy code stays grpc-free
    import grpc


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = "invalid argument"
    NOT_FOUND = "not found"
    RESOURCE_EXHAUSTED = "resource exhausted"
    DATA_LOSS = "data loss"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline exceeded"
    FAILED_PRECONDITION = "failed precondition"
    PERMISSION_DENIED = "permission denied"
    UNAUTHENTICATED = "unauthenticated"
    INTERNAL = "internal"
    CANCELLED = "cancelled"


class StrataError(Exception):
    def __init__(self, kind: ErrorKind, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.message}"


def to_status_code(kind: ErrorKind) -> "grpc.StatusCode":
    import grpc

    return {
        ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
        ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
        ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
        ErrorKind.DATA_LOSS: grpc.StatusCode.DATA_LOSS,
        ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
        ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
        ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
        ErrorKind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
        ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
        ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
        ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    }[kind]


def from_rpc_error(err: "grpc.RpcError", peer: str) -> StrataError:
    """A peer's failure as seen by its caller. A dead or slow peer is UNAVAILABLE /
    DEADLINE_EXCEEDED; a peer's own error keeps its kind and message."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    kind = next((k for k in ErrorKind if to_status_code(k) == code), ErrorKind.INTERNAL)
    local = details in ("Deadline Exceeded",) or details.startswith(("failed to connect", "Socket closed", "connections to all backends failing"))
    if kind is ErrorKind.UNAVAILABLE and local:
        return StrataError(kind, f"{peer} is unavailable ({details})")
    if kind is ErrorKind.DEADLINE_EXCEEDED and local:
        return StrataError(kind, f"{peer} did not answer within the deadline")
    return StrataError(kind, f"{peer}: {details}")


def invalid(message: str) -> StrataError:
    return StrataError(ErrorKind.INVALID_ARGUMENT, message)


F = TypeVar("F", bound=Callable)
log = logging.getLogger("strata.rpc")


def _refuse(fn: Callable, context, e: Exception) -> None:
    """Ends the call with `e`'s status. A StrataError (the caller's or a peer's fault)
    is one log line naming the method, the peer and the reason; anything else is a bug,
    logged with its traceback and sent as INTERNAL."""
    if isinstance(e, StrataError):
        log.warning("%s from %s: %s", fn.__name__, context.peer(), e)
        context.abort(to_status_code(e.kind), e.message)
    log.exception("%s from %s failed", fn.__name__, context.peer())
    context.abort(to_status_code(ErrorKind.INTERNAL), f"{type(e).__name__}: {e}")


def grpc_method(fn: F) -> F:
    """Wraps a unary servicer method: StrataError -> abort with its status code;
    anything else -> INTERNAL with the exception text (never a hang, never a traceback
    on the wire)."""

    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except Exception as e:  # noqa: BLE001 - the boundary of the service
            _refuse(fn, context, e)

    return wrapper  # type: ignore[return-value]


def grpc_stream_method(fn: F) -> F:
    """As grpc_method, for server-streaming methods (generators)."""

    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            yield from fn(self, request, context)
        except Exception as e:  # noqa: BLE001
            _refuse(fn, context, e)

    return wrapper  # type: ignore[return-value]
