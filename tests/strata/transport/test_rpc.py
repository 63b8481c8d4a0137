"""strata/transport/rpc.py with real gRPC servers in this process: a used address is refused,
an API key is required where set, a malformed request is one log line, TLS works
with the client's root certificate."""

from __future__ import annotations

import logging
import shutil
import subprocess

import grpc
import pytest

from strata.runtime.errors import ErrorKind, StrataError, grpc_method, grpc_stream_method
from strata.transport import rpc
from strata.transport.wire import common_pb2, generate_pb2, generate_pb2_grpc

KEY = "s3cret-key"


class Echo(generate_pb2_grpc.GeneratorServicer):
    @grpc_method
    def Health(self, request, context):
        return common_pb2.HealthResponse(ready=True, service="echo")

    @grpc_stream_method
    def Generate(self, request, context):
        yield generate_pb2.GenerateResponse(step=request.max_new_tokens, done=True)


def start(address="127.0.0.1:0", credentials=None, **kw) -> tuple[grpc.Server, str]:
    server = rpc.server(2, 1 << 20, **kw)
    generate_pb2_grpc.add_GeneratorServicer_to_server(Echo(), server)
    port = rpc.bind(server, address, credentials)
    server.start()
    return server, rpc.bound_address(address, port)


def call(address: str, **kw) -> int:
    with rpc.channel(address, **kw) as ch:
        responses = list(generate_pb2_grpc.GeneratorStub(ch).Generate(
            generate_pb2.GenerateRequest(max_new_tokens=7), timeout=10))
    return responses[-1].step


def test_a_second_server_on_a_used_port_is_refused_naming_the_address():
    first, address = start()
    try:
        with pytest.raises(StrataError) as info:
            start(address)
        assert info.value.kind is ErrorKind.UNAVAILABLE
        assert f"cannot listen on {address}: address already in use" in str(info.value)
        with pytest.raises(StrataError, match="address already in use"):
            rpc.check_free(address)
        assert call(address) == 7  # the first still serves
    finally:
        first.stop(None)


def test_loopback_addresses():
    assert all(rpc.is_loopback(a) for a in ("127.0.0.1:1", "localhost:1", "[::1]:1", "unix:///tmp/x.sock"))
    assert not any(rpc.is_loopback(a) for a in ("0.0.0.0:1", "[::]:1", "10.1.2.3:1", "example.com:1"))


def test_calls_without_the_api_key_are_unauthenticated():
    server, address = start(public=True, api_key=KEY)
    try:
        for key, message in (("", "missing API key"), ("wrong", "wrong API key")):
            with pytest.raises(grpc.RpcError) as info:
                call(address, api_key=key)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert message in info.value.details()
        with rpc.channel(address) as ch:  # Health too
            with pytest.raises(grpc.RpcError) as info:
                generate_pb2_grpc.GeneratorStub(ch).Health(common_pb2.HealthRequest(), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert call(address, api_key=KEY) == 7
    finally:
        server.stop(None)


def test_a_malformed_request_is_invalid_argument_and_one_log_line(caplog):
    server, address = start(public=True)
    try:
        with rpc.channel(address) as ch, caplog.at_level(logging.WARNING):
            raw = ch.unary_stream("/strata.wire.Generator/Generate")  # bytes in, bytes out
            with pytest.raises(grpc.RpcError) as info:
                list(raw(b"\x0a\x04\x0a\x02\xff\xfe", timeout=10))  # prompts[0].text: not UTF-8
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed Generate request" in info.value.details()
        lines = [r for r in caplog.records if "malformed" in r.getMessage()]
        assert len(lines) == 1 and lines[0].exc_info is None and "ipv4:127.0.0.1" in lines[0].getMessage()
        assert not any(r.exc_info for r in caplog.records)  # gRPC's own "Exception deserializing" traceback
    finally:
        server.stop(None)


def test_a_servicer_error_is_one_line_naming_the_peer(caplog):
    class Refusing(Echo):
        @grpc_stream_method
        def Generate(self, request, context):
            raise StrataError(ErrorKind.INVALID_ARGUMENT, "no such thing")
            yield  # pragma: no cover

    server = rpc.server(2, 1 << 20, public=True)
    generate_pb2_grpc.add_GeneratorServicer_to_server(Refusing(), server)
    address = rpc.bound_address("127.0.0.1:0", rpc.bind(server, "127.0.0.1:0"))
    server.start()
    try:
        with caplog.at_level(logging.WARNING), pytest.raises(grpc.RpcError) as info:
            call(address)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        [line] = [r for r in caplog.records if "no such thing" in r.getMessage()]
        assert line.exc_info is None and "Generate from ipv4:127.0.0.1" in line.getMessage()
    finally:
        server.stop(None)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True, timeout=60)
    return str(d / "cert.pem"), str(d / "key.pem")


def test_tls_with_the_servers_certificate_as_root(tls_files):
    cert, key = tls_files
    security = rpc.ServerSecurity(KEY, cert, key)
    assert KEY not in repr(security)
    server, address = start(credentials=security.credentials(), public=True, api_key=KEY)
    try:
        assert call(address, api_key=KEY, tls_ca=cert) == 7
        with pytest.raises(grpc.RpcError) as info:  # a plain channel cannot talk to it
            with rpc.channel(address, api_key=KEY) as ch:
                list(generate_pb2_grpc.GeneratorStub(ch).Generate(generate_pb2.GenerateRequest(), timeout=5))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)


def test_tls_needs_both_files():
    with pytest.raises(StrataError, match="both"):
        rpc.ServerSecurity(tls_cert="cert.pem")
