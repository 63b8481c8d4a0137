"""Faults and bad input a new user meets (issue 18), through `strata serve` and
`strata generate` as real processes and real gRPC: a port in use, oversized and
out-of-range requests, a hung service, who may call, what goes to stdout and the logs,
a model without a tokenizer, leftovers of killed runs, CLI messages."""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import psutil
import pytest

from deploy.cli import build_parser
from deploy.client import generate, request_for
from deploy.launcher import RUNDIR_PREFIX
from serving import ROOT, Server, strata
from strata.runtime.errors import ErrorKind, StrataError
from strata.transport import rpc
from strata.transport.wire import generate_pb2, generate_pb2_grpc
from tools.convert import TOKENIZER_FILES, convert

KEY = "test-key-1234"
MAX_REQUEST_BYTES = 1 << 20
MAX_PROMPT_TOKENS = 40  # so at most 16 x 40 = 640 characters
GOOD = [5, 17, 33]
CALL_S = 60


class Drained:
    """A started Server whose stdout and stderr are read as they come (a full pipe would
    block the services), kept for the tests to look at."""

    def __init__(self, server: Server):
        self.server, self.out, self.err = server, [], []
        self.readers = [threading.Thread(target=self._read, args=(pipe, lines), daemon=True)
                        for pipe, lines in ((server.proc.stdout, self.out), (server.proc.stderr, self.err))]
        for t in self.readers:
            t.start()

    @staticmethod
    def _read(pipe, lines):
        with contextlib.suppress(ValueError, OSError):
            for line in pipe:
                lines.append(line)

    def stderr_has(self, text: str, timeout: float = 10) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in "".join(self.err):
                return True
            time.sleep(0.1)
        return False

    def wait(self, timeout: float) -> int:
        code = self.server.proc.wait(timeout=timeout)
        self.exited_at = time.monotonic()
        for t in self.readers:  # to the pipes' end: every line written is read
            t.join(timeout=20)
        return code


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model(tiny_opt, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("hardening") / "s16"
    convert(tiny_opt, out, bits=16)
    return out


@pytest.fixture(scope="module")
def model_without_tokenizer(tiny_opt, tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("no-tokenizer")
    shutil.copytree(tiny_opt, root / "hf", ignore=shutil.ignore_patterns(*TOKENIZER_FILES))
    convert(root / "hf", root / "s16", bits=16)
    return root / "s16"


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True, timeout=60)
    return str(d / "cert.pem"), str(d / "key.pem")


@pytest.fixture(scope="module")
def guarded(model, tls):
    """A server with every guard: API key, TLS, small request limits, the KV store."""
    cert, key = tls
    s = Server(model, "--kv-offload", "--kv-capacity-gb", "0.25", "--api-key", KEY, "--tls-cert", cert,
               "--tls-key", key, "--max-request-bytes", str(MAX_REQUEST_BYTES),
               "--max-prompt-tokens", str(MAX_PROMPT_TOKENS))
    d = Drained(s)
    d.ca = cert  # self-signed: its own root
    yield d
    assert s.stop() == 0


def channel(guarded, key=KEY, tls_ca=True):
    return rpc.channel(guarded.server.address, api_key=key, tls_ca=guarded.ca if tls_ca else "")


def raw_error(guarded, req, key=KEY, tls_ca=True) -> grpc.RpcError:
    with channel(guarded, key, tls_ca) as ch, pytest.raises(grpc.RpcError) as info:
        list(generate_pb2_grpc.GeneratorStub(ch).Generate(req, timeout=CALL_S))
    return info.value


def assert_serves(guarded):
    result = generate(guarded.server.address, request_for([GOOD], 3), timeout=CALL_S, api_key=KEY, tls_ca=guarded.ca)
    assert [len(t) for t in result.tokens] == [3]


# ---------------------------------------------------------------- 1. a port in use


def test_serve_on_a_port_in_use_exits_saying_so(guarded, model):
    t0 = time.monotonic()
    out = strata("serve", str(model), "--listen", guarded.server.address, timeout=120)
    assert out.returncode == 1
    assert f"cannot listen on {guarded.server.address}: address already in use" in out.stderr
    assert "listening on" not in out.stdout
    assert time.monotonic() - t0 < 30  # found before any service starts
    assert_serves(guarded)


def test_a_store_on_a_used_tcp_port_refuses_to_start(guarded, model):
    out = subprocess.run([sys.executable, "-m", "weight_store", "--model", str(model), "--listen",
                          guarded.server.address, "--no-preload"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "address already in use" in out.stderr


# ---------------------------------------------------------------- 2. one request cannot take the service down


def test_oversized_requests_fail_fast_and_the_server_keeps_serving(guarded):
    cases = [
        (request_for(["a" * (2 * MAX_REQUEST_BYTES)], 4), "--max-request-bytes"),
        (request_for(["word " * 2000], 4), f"prompt 0 has 10000 characters; the limit is {16 * MAX_PROMPT_TOKENS}"),
        (request_for(["1 2 3 4 5 6 7 8 9 " * 20], 4), f"prompt 0 has more than {MAX_PROMPT_TOKENS} tokens"),
        (request_for([[5] * (MAX_PROMPT_TOKENS + 1)], 4), f"has {MAX_PROMPT_TOKENS + 1} tokens; the limit"),
    ]
    for req, message in cases:
        t0 = time.monotonic()
        with pytest.raises(StrataError) as info:
            generate(guarded.server.address, req, timeout=CALL_S, api_key=KEY, tls_ca=guarded.ca)
        assert time.monotonic() - t0 < 2.0, message
        assert info.value.kind is ErrorKind.INVALID_ARGUMENT
        assert message in str(info.value)
    assert_serves(guarded)


# ---------------------------------------------------------------- 5. the server checks every field itself


@pytest.mark.parametrize("field, value", [("temperature", math.nan), ("temperature", -1.0), ("temperature", math.inf),
                                          ("top_p", 1.5), ("top_p", -0.5), ("top_p", math.nan)])
def test_bad_sampling_is_invalid_argument_naming_the_field(guarded, field, value):
    req = request_for([GOOD], 3, greedy=False)
    setattr(req.sampling, field, value)
    err = raw_error(guarded, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert f"sampling.{field}" in err.details()


# ---------------------------------------------------------------- 10. who may call


def test_calls_need_the_api_key_and_tls(guarded, tmp_path):
    for key in ("", "wrong"):
        err = raw_error(guarded, request_for([GOOD], 3), key=key)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    err = raw_error(guarded, request_for([GOOD], 3), tls_ca=False)  # plain text to a TLS port
    assert err.code() == grpc.StatusCode.UNAVAILABLE

    base = ["generate", "--endpoint", guarded.server.address, "--prompt-ids", "5,17,33", "--max-new-tokens", "3",
            "--ids", "--tls-ca", guarded.ca]
    out = strata(*base, "--api-key", KEY)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.split()) == 3
    out = strata(*base)
    assert out.returncode == 1 and "unauthenticated" in out.stderr and "Traceback" not in out.stderr
    env = dict(os.environ, **{rpc.API_KEY_ENV: KEY})
    out = subprocess.run([sys.executable, "-m", "deploy.cli", *base], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr


def test_serve_refuses_a_reachable_address_without_an_api_key(model):
    out = strata("serve", str(model), "--listen", "0.0.0.0:0", timeout=60)
    assert out.returncode == 2
    assert "--api-key" in out.stderr and "--insecure" in out.stderr
    assert "listening on" not in out.stdout


# ---------------------------------------------------------------- 8, 9. stdout and the logs


def test_only_serve_says_listening_on_and_a_malformed_request_is_one_log_line(guarded):
    with channel(guarded) as ch, pytest.raises(grpc.RpcError) as info:
        list(ch.unary_stream("/strata.wire.Generator/Generate")(b"\x0a\x04\x0a\x02\xff\xfe", timeout=CALL_S))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed Generate request" in info.value.details()
    assert guarded.stderr_has("malformed Generate request")
    raw_error(guarded, request_for([[5, 9999]], 3))  # a bad field: one line too
    assert guarded.stderr_has("outside the vocabulary")

    err = "".join(guarded.err)
    assert "Traceback" not in err
    [line] = [x for x in guarded.err if "malformed Generate request" in x]
    assert "compute_node" in line and "ipv4:127.0.0.1" in line
    assert "listening on" not in err  # the services say "serving on", on stderr
    assert "kv_store" in err and "weight_store" in err
    assert guarded.out == []  # nothing after serve's own "listening on" line


# ---------------------------------------------------------------- a server to hang: 4, 5, 6, 7


@pytest.fixture(scope="module")
def fragile(model_without_tokenizer):
    """A model without a tokenizer, served with a short health timeout; the last test
    stops its compute node. Before it starts, two run directories as a killed launcher
    and a live one leave them."""
    stale = pathlib.Path(tempfile.mkdtemp(prefix=f"{RUNDIR_PREFIX}{dead_pid()}-deadbeef-"))
    live = pathlib.Path(tempfile.mkdtemp(prefix=f"{RUNDIR_PREFIX}{os.getpid()}-cafebabe-"))
    try:
        s = Server(model_without_tokenizer, "--health-timeout", "8")
    finally:
        shutil.rmtree(stale, ignore_errors=True)  # (removed already where serve did its job)
    d = Drained(s)
    d.stale_existed_after_start, d.live_existed_after_start = stale.exists(), live.exists()
    shutil.rmtree(live, ignore_errors=True)
    yield d
    for pid in s.children:  # a failed test may leave the compute node stopped
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    s.stop()


def test_serve_removes_run_directories_of_killed_launchers_only(fragile):
    assert not fragile.stale_existed_after_start
    assert fragile.live_existed_after_start


def test_a_model_without_tokenizer_gives_ids_but_refuses_text(fragile):
    base = ["generate", "--endpoint", fragile.server.address, "--prompt-ids", "5,17,33", "--max-new-tokens", "2"]
    out = strata(*base)
    assert out.returncode == 1
    assert "no tokenizer.json" in out.stderr and "--ids" in out.stderr
    assert out.stdout == ""
    out = strata(*base, "--ids")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.split()) == 2
    out = strata("generate", "--endpoint", fragile.server.address, "--prompt", "hello", "--max-new-tokens", "2")
    assert out.returncode == 1 and "tokenizer" in out.stderr


def _connected(pid: int, port: int) -> bool:
    with contextlib.suppress(psutil.Error):
        return any(c.raddr and c.raddr.port == port for c in psutil.Process(pid).net_connections())
    return False


def test_a_hung_compute_node_times_clients_out_and_serve_stops_everything(fragile):
    server = fragile.server
    compute = server.child("compute_node")
    rundir = next(pathlib.Path(tempfile.gettempdir()).glob(f"{RUNDIR_PREFIX}{server.proc.pid}-*"))
    compute.suspend()
    t_hung = time.monotonic()

    # a client's deadline
    base = ["generate", "--endpoint", server.address, "--prompt-ids", "5,17,33", "--max-new-tokens", "2", "--ids"]
    t0 = time.monotonic()
    out = strata(*base, "--timeout", "2", timeout=60)
    assert out.returncode == 1 and "did not answer within the deadline" in out.stderr
    assert time.monotonic() - t0 < 10

    # Ctrl-C in a call that would wait its default 600 s
    port = int(server.address.rsplit(":", 1)[1])
    client = subprocess.Popen([sys.executable, "-m", "deploy.cli", *base], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not _connected(client.pid, port) and time.monotonic() < deadline:
            time.sleep(0.05)
        client.send_signal(signal.SIGINT)
        _, err = client.communicate(timeout=30)
    finally:
        client.kill()
    assert client.returncode == 2 and "interrupted" in err and "Traceback" not in err, err

    # serve notices the compute node answers no health check, names it, stops all
    code = fragile.wait(timeout=60)
    assert code == 1
    assert 5 <= fragile.exited_at - t_hung < 40  # 8 s after its last answer, checked every 2 s
    err = "".join(fragile.err)
    assert "compute node answered no health check for 8 s; stopping" in err
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in server.children)
    assert not rundir.exists()


# ---------------------------------------------------------------- 4, 5, 12. the CLI alone


def test_generate_has_a_default_deadline():
    a = build_parser().parse_args(["generate", "--endpoint", "h:1", "--prompt", "x", "--max-new-tokens", "1"])
    assert a.timeout == 600
    a = build_parser().parse_args(["generate", "--endpoint", "h:1", "--prompt", "x", "--max-new-tokens", "1",
                                   "--timeout", "0"])
    assert a.timeout == 0  # no deadline


@pytest.mark.parametrize("args, flag", [
    (["--prompt-ids", str(1 << 63)], "--prompt-ids"),
    (["--prompt-ids", "5", "--max-new-tokens", str(1 << 32)], "--max-new-tokens"),
    (["--prompt", b"caf\xe9"], "--prompt"),
    (["--prompt", "x", "--stop", b"\xff"], "--stop"),
    (["--prompt", "x", "--top-k", "-1"], "--top-k"),
    (["--prompt", "x", "--seed", "-1"], "--seed"),
    (["--prompt", "x", "--seed", str(1 << 64)], "--seed"),
    (["--prompt", "x", "--temperature", "nan"], "--temperature"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature"),
    (["--prompt", "x", "--top-p", "1.5"], "--top-p"),
    (["--prompt", "x", "--top-p", "-0.5"], "--top-p"),
    (["--prompt", "x", "--top-p", "nan"], "--top-p"),
    (["--prompt", "x", "--timeout", "-1"], "--timeout"),
])
def test_generate_refuses_values_the_wire_cannot_carry(args, flag):
    if "--max-new-tokens" not in args:
        args = [*args, "--max-new-tokens", "3"]
    out = subprocess.run([sys.executable, "-m", "deploy.cli", "generate", "--endpoint", "127.0.0.1:1", *args],
                         cwd=ROOT, capture_output=True, timeout=60)
    err = out.stderr.decode(errors="replace")
    assert out.returncode == 2, err
    assert f"argument {flag}" in err and "Traceback" not in err


def test_serve_on_cuda_without_a_gpu_says_no_cuda_device_was_found(model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    out = strata("serve", str(model), "--device", "cuda", timeout=120)
    assert out.returncode == 1
    assert "no CUDA device was found" in out.stderr and "profile" not in out.stderr


def test_every_argument_of_convert_serve_generate_demo_has_a_help_text():
    sub = next(a for a in build_parser()._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    missing = [(name, act.option_strings or act.dest) for name in ("convert", "serve", "generate", "demo")
               for act in sub.choices[name]._actions if act.dest != "help" and not act.help]
    assert missing == []
