"""gRPC servers and client channels, built in one place.

Every server refuses an address already in use (`grpc.so_reuseport` = 0: gRPC would
otherwise share the port with another server, and requests would reach either) and
takes no message larger than its receive limit. A public server (the compute node)
also parses each request itself, so a malformed one is one log line and
INVALID_ARGUMENT rather than a traceback, and with an API key refuses every call
that lacks `authorization: Bearer KEY` metadata (UNAUTHENTICATED). TLS is
`grpc.ssl_server_credentials` on the server and a root certificate on the client.
"""

from __future__ import annotations

import dataclasses
import errno
import hmac
import ipaddress
import logging
import pathlib
import socket
from concurrent import futures

import grpc

from strata.runtime.errors import ErrorKind, StrataError, invalid, to_status_code

log = logging.getLogger("strata.rpc")

MAX_SEND_BYTES = 1 << 30
DEFAULT_MAX_REQUEST_BYTES = 64 << 20
API_KEY_ENV = "STRATA_API_KEY"


@dataclasses.dataclass(frozen=True)
class ServerSecurity:
    """Who may call a public server: an API key ("" = anyone) and TLS (PEM files; both
    or neither)."""

    api_key: str = ""
    tls_cert: str = ""
    tls_key: str = ""

    def __post_init__(self):
        if bool(self.tls_cert) != bool(self.tls_key):
            raise StrataError(ErrorKind.INVALID_ARGUMENT, "TLS needs both a certificate and its key")

    def __repr__(self) -> str:  # never print the key
        return f"ServerSecurity(api_key={'set' if self.api_key else 'none'}, tls={bool(self.tls_cert)})"

    def credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls_cert:
            return None
        return grpc.ssl_server_credentials([(_read(self.tls_key, "TLS key"), _read(self.tls_cert, "TLS certificate"))])


def server(max_workers: int, max_receive_bytes: int, *, name: str = "grpc", public: bool = False,
           api_key: str = "") -> grpc.Server:
    """A gRPC server that refuses a used address and messages over `max_receive_bytes`.
    `public`: parse requests here (malformed -> INVALID_ARGUMENT, one log line) and,
    with an `api_key`, refuse calls without it."""
    options = [
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", max_receive_bytes),
        ("grpc.max_send_message_length", MAX_SEND_BYTES),
    ]
    interceptors = []
    if public:
        interceptors = ([ApiKeyInterceptor(api_key)] if api_key else []) + [WellFormedInterceptor()]
    elif api_key:
        raise ValueError("an API key is checked by public servers only")
    pool = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name)
    return grpc.server(pool, options=options, interceptors=interceptors)


def bind(srv: grpc.Server, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
    """Adds a listening port at `address` ("host:port" or "unix:///path"); returns the
    bound port (1 for a Unix socket). Raises StrataError(UNAVAILABLE) naming the address
    and why, e.g. "address already in use"."""
    try:
        port = srv.add_secure_port(address, credentials) if credentials else srv.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise StrataError(ErrorKind.UNAVAILABLE, f"cannot listen on {address}: {why_unbindable(address)}")
    return port


def bound_address(address: str, port: int) -> str:
    """`address` with a port of 0 replaced by the one bound."""
    if address.startswith("unix:") or address.rsplit(":", 1)[-1] != "0":
        return address
    return f"{address.rsplit(':', 1)[0]}:{port}"


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise StrataError(ErrorKind.INVALID_ARGUMENT, f"address {address!r} is not host:port or unix:///path")
    return host.strip("[]"), int(port)


def why_unbindable(address: str) -> str:
    """Why `address` cannot be listened on, found by binding a plain socket there."""
    if address.startswith("unix:"):
        path = pathlib.Path(address.removeprefix("unix://").removeprefix("unix:"))
        return "its directory does not exist" if not path.parent.is_dir() else "cannot bind the socket there"
    try:
        check_free(address)
    except StrataError as e:
        return e.message.split(": ", 1)[-1]
    return "gRPC could not bind it"


def check_free(address: str) -> None:
    """Raises StrataError(UNAVAILABLE, "... address already in use") when a TCP
    `address` cannot be bound now (Unix sockets and port 0 always pass)."""
    if address.startswith("unix:"):
        return
    host, port = _host_port(address)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise StrataError(ErrorKind.UNAVAILABLE, f"cannot listen on {address}: unknown host ({e.strerror})") from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: TIME_WAIT is no obstacle
            try:
                s.bind(sockaddr)
            except OSError as e:
                reason = "address already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e)).lower()
                raise StrataError(ErrorKind.UNAVAILABLE, f"cannot listen on {address}: {reason}") from None


def is_loopback(address: str) -> bool:
    """Whether only this host can reach `address` (a Unix socket, localhost, 127.x, ::1)."""
    if address.startswith("unix:"):
        return True
    host, _ = _host_port(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to may be reachable from elsewhere


# ---------------------------------------------------------------- server interceptors


def _replace(handler: grpc.RpcMethodHandler, unary_unary, unary_stream) -> grpc.RpcMethodHandler | None:
    """A handler of `handler`'s kind that takes the raw request bytes."""
    if handler.unary_unary is not None and unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=handler.response_serializer)
    if handler.unary_stream is not None and unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(unary_stream, response_serializer=handler.response_serializer)
    return None


def _method_name(details: grpc.HandlerCallDetails) -> str:
    return details.method.rsplit("/", 1)[-1]


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Refuses every call whose metadata lacks `authorization: Bearer KEY` with
    UNAUTHENTICATED, before its request is parsed."""

    def __init__(self, api_key: str):
        self._expected = f"Bearer {api_key}".encode()

    def intercept_service(self, continuation, details):
        given = next((v for k, v in details.invocation_metadata or () if k == "authorization"), "")
        given = given.encode() if isinstance(given, str) else given
        handler = continuation(details)
        if handler is None or hmac.compare_digest(given, self._expected):
            return handler
        method = _method_name(details)
        message = "missing API key (authorization: Bearer KEY)" if not given else "wrong API key"

        def refuse(_raw, context):
            log.warning("refused %s from %s: %s", method, context.peer(), message)
            context.abort(to_status_code(ErrorKind.UNAUTHENTICATED), message)

        def refuse_stream(raw, context):
            refuse(raw, context)
            yield  # pragma: no cover - abort raised

        return _replace(handler, refuse, refuse_stream) or handler


class WellFormedInterceptor(grpc.ServerInterceptor):
    """Parses each unary request here: a malformed one (bad protobuf, a string that is
    not UTF-8) is INVALID_ARGUMENT and one log line with the peer and the reason, not
    gRPC's traceback and INTERNAL."""

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse, method = handler.request_deserializer, _method_name(details)

        def parsed(raw, context):
            try:
                return parse(raw)
            except Exception as e:  # noqa: BLE001 - any parse failure is the caller's
                reason = f"malformed {method} request: {e}"
                log.warning("%s: %s", context.peer(), reason)
                context.abort(to_status_code(ErrorKind.INVALID_ARGUMENT), reason)

        def unary(raw, context):
            return handler.unary_unary(parsed(raw, context), context)

        def stream(raw, context):
            return handler.unary_stream(parsed(raw, context), context)

        return _replace(handler, unary, stream) or handler


# ---------------------------------------------------------------- client side


class _Metadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, pairs: tuple[tuple[str, str], ...]):
        self.pairs = pairs

    def _with(self, details):
        return details._replace(metadata=tuple(details.metadata or ()) + self.pairs)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with(details), request)


def channel(endpoint: str, *, api_key: str = "", tls_ca: str = "", options=()) -> grpc.Channel:
    """A client channel to `endpoint`: TLS with `tls_ca` (a PEM root certificate file)
    as its root, and `authorization: Bearer KEY` on every call with an `api_key`."""
    if tls_ca:
        creds = grpc.ssl_channel_credentials(root_certificates=_read(tls_ca, "TLS CA certificate"))
        ch = grpc.secure_channel(endpoint, creds, options=list(options))
    else:
        ch = grpc.insecure_channel(endpoint, options=list(options))
    if api_key:
        ch = grpc.intercept_channel(ch, _Metadata((("authorization", f"Bearer {api_key}"),)))
    return ch


def _read(path: str, what: str) -> bytes:
    try:
        return pathlib.Path(path).read_bytes()
    except OSError as e:
        raise invalid(f"cannot read the {what} {path!r}: {e.strerror}") from None
