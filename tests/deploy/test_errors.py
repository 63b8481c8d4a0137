"""Every error a user can hit, through the real processes and the real CLI / gRPC: a
clear message, the right gRPC status code, the CLI's exit code, and nothing left
running or in /dev/shm when `strata serve` gives up."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import time

import grpc
import psutil
import pytest

import tiny_models
from deploy.client import generate, request_for
from serving import Server, kill_quietly, shm_entries, strata
from strata.runtime.errors import ErrorKind, StrataError
from strata.transport import shm
from strata.transport.wire import generate_pb2, generate_pb2_grpc
from tools.convert import convert

CLIENT_TIMEOUT_S = 60
VOCAB = 512  # tiny OPT
POSITIONS = 128  # tiny OPT's max_position_embeddings
GOOD = [5, 17, 33]


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def hf_opt(tmp_path_factory) -> pathlib.Path:
    return tiny_models.make_opt(tmp_path_factory.mktemp("errors") / "hf")


@pytest.fixture(scope="module")
def model(hf_opt) -> pathlib.Path:
    out = hf_opt.parent / "s16"
    convert(hf_opt, out, bits=16)
    return out


def damaged_copy(model: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    dst = tmp_path / "damaged"
    shutil.copytree(model, dst)
    return dst


def processes_naming(text: str) -> list[psutil.Process]:
    """Live processes whose command line mentions `text` (a test's unique tmp path)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if p.info["status"] != psutil.STATUS_ZOMBIE and text in " ".join(p.info["cmdline"] or []):
                found.append(p)
    return found


def session_of(server: Server) -> str:
    args = server.child("weight_store").cmdline()
    return args[args.index("--session") + 1]


def session_shm(session: str) -> set[str]:
    return {n for n in shm_entries(orphans_only=False) if n.startswith(f"strata-{session}-")}


def raw_generate(address: str, request: generate_pb2.GenerateRequest) -> grpc.RpcError:
    """The RpcError a raw Generate call ends with (fails the test if it succeeds)."""
    with grpc.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GeneratorStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            for _ in stub.Generate(request, timeout=CLIENT_TIMEOUT_S):
                pass
    return info.value


def generate_error(address: str, request: generate_pb2.GenerateRequest) -> StrataError:
    with pytest.raises(StrataError) as info:
        generate(address, request, timeout=CLIENT_TIMEOUT_S)
    return info.value


def assert_serves(address: str) -> None:
    result = generate(address, request_for([GOOD], 3), timeout=CLIENT_TIMEOUT_S)
    assert [len(t) for t in result.tokens] == [3]


def serve_fails_at_start(model_dir: pathlib.Path) -> tuple[int, str, float]:
    """Runs `strata serve` that must fail; returns (exit code, stderr, seconds) after
    checking that nothing of it is left running or in /dev/shm."""
    before = shm_entries()
    t0 = time.monotonic()
    out = strata("serve", str(model_dir), "--listen", "127.0.0.1:0", timeout=120)
    elapsed = time.monotonic() - t0
    assert "listening on" not in out.stdout
    assert processes_naming(str(model_dir)) == []
    # Tests beside us may hold regions of their own sessions; anything new whose
    # session has no live process was left by the serve under test.
    assert {n for n in shm_entries() - before if n.split("-")[1] not in live_sessions()} == set()
    return out.returncode, out.stderr, elapsed


def live_sessions() -> set[str]:
    live = set()
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            args = p.info["cmdline"] or []
            if "--session" in args:
                live.add(args[args.index("--session") + 1])
    return live


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids: list[int], timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while time.monotonic() < deadline:
        alive = [p for p in pids if _running(p)]
        if not alive:
            break
        time.sleep(0.1)
    return alive


# ---------------------------------------------------------------- 1. CLI: convert / serve of a wrong directory


def test_convert_of_missing_directory_exits_1_naming_it(tmp_path):
    missing = tmp_path / "no-such-model"
    out = strata("convert", str(missing), str(tmp_path / "out"))
    assert out.returncode == 1
    assert str(missing) in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()


def test_convert_of_directory_without_checkpoint_exits_1_naming_it(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = strata("convert", str(empty), str(tmp_path / "out"))
    assert out.returncode == 1
    assert str(empty) in out.stderr and "config.json" in out.stderr
    assert "Traceback" not in out.stderr


def test_convert_of_unsupported_architecture_exits_1_naming_it(tmp_path):
    src = tmp_path / "llama"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "mystery", "architectures": ["MysteryForCausalLM"]}')
    out = strata("convert", str(src), str(tmp_path / "out"))
    assert out.returncode == 1
    assert "mystery" in out.stderr and "not supported" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()


def test_convert_with_3_bits_is_a_usage_error(hf_opt, tmp_path):
    out = strata("convert", str(hf_opt), str(tmp_path / "out"), "--quant-bits", "3")
    assert out.returncode == 2
    assert "--quant-bits" in out.stderr and "invalid choice: 3" in out.stderr
    assert not (tmp_path / "out").exists()


def test_serve_of_unconverted_directory_exits_quickly_naming_it(hf_opt):
    code, err, elapsed = serve_fails_at_start(hf_opt)  # an HF checkpoint, not a Strata one
    assert code != 0
    assert elapsed < 30
    assert str(hf_opt) in err and "manifest.json" in err
    assert "strata serve:" in err  # the run plan is resolved from the manifest before any service starts
    assert "Traceback" not in err


def test_serve_of_missing_directory_exits_quickly_naming_it(tmp_path):
    missing = tmp_path / "nowhere"
    code, err, elapsed = serve_fails_at_start(missing)
    assert code != 0
    assert elapsed < 30
    assert str(missing) in err
    assert "Traceback" not in err


# ---------------------------------------------------------------- 2. damaged shards


def test_serve_with_corrupt_shard_fails_naming_the_file(model, tmp_path):
    bad = damaged_copy(model, tmp_path)
    manifest = json.loads((bad / "manifest.json").read_text())
    shard = next(s for s in manifest["shards"] if s["file"].startswith("layer_"))
    part = next(iter(next(iter(shard["tensors"].values()))["parts"].values()))
    path = bad / shard["file"]
    data = bytearray(path.read_bytes())
    data[part["offset"] + part["length"] // 2] ^= 0xFF
    path.write_bytes(data)

    code, err, elapsed = serve_fails_at_start(bad)
    assert code != 0
    assert str(path) in err
    assert "sha256" in err or "checksum" in err
    assert "Traceback" not in err


def test_serve_with_truncated_shard_fails_naming_the_file(model, tmp_path):
    bad = damaged_copy(model, tmp_path)
    path = sorted(bad.glob("layer_*.bin"))[-1]
    os.truncate(path, path.stat().st_size // 3)

    code, err, elapsed = serve_fails_at_start(bad)
    assert code != 0
    assert str(path) in err
    assert "truncated" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------- 3. bad requests


@pytest.fixture(scope="module")
def server(model):
    s = Server(model, "--kv-offload")
    yield s
    assert s.stop() == 0


BAD_REQUESTS = {
    "token-out-of-vocabulary": (request_for([[5, VOCAB, 7]], 4), f"token id {VOCAB} outside the vocabulary"),
    "negative-token": (request_for([[5, -3]], 4), "token id -3 outside the vocabulary"),
    "empty-ids": (request_for([[]], 4), "prompt 0 is empty"),
    "empty-text": (request_for([""], 4), "prompt 0 is empty"),
    "second-prompt-empty": (request_for([GOOD, []], 4), "prompt 1 is empty"),
    "no-input": (generate_pb2.GenerateRequest(prompts=[generate_pb2.Prompt()], max_new_tokens=4), "prompt 0 is empty"),
    "no-prompts": (request_for([], 4), "no prompts"),
    "beyond-positions": (request_for([GOOD], POSITIONS), f"exceeds the model's {POSITIONS} positions"),
    "zero-new-tokens": (request_for([GOOD], 0), "max_new_tokens must be at least 1"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_invalid_argument_and_server_keeps_serving(server, case):
    request, message = BAD_REQUESTS[case]
    err = raw_generate(server.address, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.details()

    e = generate_error(server.address, request)
    assert e.kind is ErrorKind.INVALID_ARGUMENT
    assert message in str(e)

    assert_serves(server.address)


def test_cli_generate_of_bad_requests_exits_1_with_the_reason(server):
    base = ["generate", "--endpoint", server.address, "--greedy"]
    cases = [
        (["--prompt", "", "--max-new-tokens", "4"], "prompt 0 is empty"),
        (["--prompt-ids", f"5,{VOCAB + 10}", "--max-new-tokens", "4"], f"token id {VOCAB + 10} outside the vocabulary"),
        (["--prompt", "hello", "--max-new-tokens", "500"], f"{POSITIONS} positions"),
        (["--prompt-ids", "5,6", "--max-new-tokens", "0"], "max_new_tokens must be at least 1"),
    ]
    for args, message in cases:
        out = strata(*base, *args)
        assert out.returncode == 1, (args, out.stderr)
        assert out.stderr.startswith("strata generate: invalid argument:"), out.stderr
        assert message in out.stderr
        assert "Traceback" not in out.stderr
    out = strata(*base, "--prompt", "hello", "--max-new-tokens", "-1")
    assert out.returncode == 2 and "--max-new-tokens" in out.stderr and "Traceback" not in out.stderr
    out = strata(*base, "--prompt", "hello", "--max-new-tokens", "3")
    assert out.returncode == 0, out.stderr


def test_cli_generate_without_prompt_or_server(server, tmp_path):
    out = strata("generate", "--endpoint", server.address, "--max-new-tokens", "3")
    assert out.returncode == 2 and "--prompt" in out.stderr
    out = strata("generate", "--endpoint", f"unix://{tmp_path}/nobody.sock", "--prompt", "hi", "--max-new-tokens", "3",
                 "--timeout", "10")
    assert out.returncode == 1
    assert "unavailable" in out.stderr and "nobody.sock" in out.stderr


# ---------------------------------------------------------------- 4. a dead peer


def force_stop(server: Server, session: str) -> None:
    """After a failed test: nothing of this server is left running or in /dev/shm."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGCONT)
        server.proc.kill()
    for pid in server.children:
        kill_quietly(pid)
    wait_gone(server.children)
    shm.sweep(session)


def _assert_serve_notices_and_cleans_up(server: Server, session: str, dead: str) -> None:
    t0 = time.monotonic()
    code = server.proc.wait(timeout=30)
    assert time.monotonic() - t0 < 30
    err = server.proc.stderr.read()
    server.stop()
    assert code != 0
    assert f"{dead} exited; stopping" in err
    assert wait_gone(server.children) == []
    assert session_shm(session) == set()


def test_dead_kv_store_fails_generate_fast_then_serve_exits_and_cleans_up(model):
    server = Server(model, "--kv-offload", "--rpc-timeout", "5")
    session = session_of(server)
    try:
        assert_serves(server.address)
        kv = server.child("kv_store")

        # A hung KV store: the call between services has a deadline.
        kv.suspend()
        t0 = time.monotonic()
        err = raw_generate(server.address, request_for([GOOD], 3))
        elapsed = time.monotonic() - t0
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.details()
        assert "KV store" in err.details()
        assert elapsed < 15

        # A dead KV store, while serve is held so it cannot stop the compute node yet.
        server.proc.send_signal(signal.SIGSTOP)
        kv.kill()
        assert wait_gone([kv.pid]) == []  # a zombie while serve is stopped
        t0 = time.monotonic()
        err = raw_generate(server.address, request_for([GOOD], 3))
        elapsed = time.monotonic() - t0
        assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), err.details()
        assert "KV store" in err.details()
        assert elapsed < 10
        e = generate_error(server.address, request_for([GOOD], 3))
        assert e.kind in (ErrorKind.UNAVAILABLE, ErrorKind.DEADLINE_EXCEEDED)
        assert "KV store" in str(e)

        server.proc.send_signal(signal.SIGCONT)
        _assert_serve_notices_and_cleans_up(server, session, "KV store")
    finally:
        force_stop(server, session)


def test_dead_weight_store_makes_serve_exit_and_clean_up(model):
    server = Server(model, "--rpc-timeout", "5")
    session = session_of(server)
    try:
        assert session_shm(session)  # the host tier lives there while serving
        server.proc.send_signal(signal.SIGSTOP)
        ws = server.child("weight_store")
        ws.kill()
        assert wait_gone([ws.pid]) == []
        # The compute node keeps its mapped weights: Generate may still work; if not,
        # it fails fast and names the weight store.
        t0 = time.monotonic()
        try:
            assert_serves(server.address)
        except StrataError as e:
            assert e.kind in (ErrorKind.UNAVAILABLE, ErrorKind.DEADLINE_EXCEEDED)
            assert "weight store" in str(e)
        assert time.monotonic() - t0 < 10

        server.proc.send_signal(signal.SIGCONT)
        _assert_serve_notices_and_cleans_up(server, session, "weight store")
    finally:
        force_stop(server, session)


def test_a_killed_launcher_takes_its_services_with_it(model):
    """SIGKILL leaves the launcher no chance to stop its children: each service asked
    the kernel at start for SIGTERM when its parent dies, stops on it and removes its
    shared memory."""
    server = Server(model, "--kv-offload")
    session = session_of(server)
    try:
        assert len(server.alive_children()) == 3
        server.proc.kill()
        server.proc.wait(timeout=10)
        assert wait_gone(server.children) == []
        assert session_shm(session) == set()
    finally:
        force_stop(server, session)
        server.stop()


# ---------------------------------------------------------------- 5. KV store capacity


def test_kv_store_too_small_for_the_batch_fails_at_start_saying_how_much(model):
    """The compute node allocates every sequence slot's KV at start: a KV store too small
    for them stops `serve` then, with the sizes, not a request later."""
    capacity = int(0.000001 * (1 << 30))
    out = strata("serve", str(model), "--listen", "127.0.0.1:0", "--kv-offload", "--kv-capacity-gb", "0.000001",
                 timeout=120)
    assert out.returncode != 0
    assert "listening on" not in out.stdout
    assert "KV store" in out.stderr and f"only {capacity} of {capacity} bytes are free" in out.stderr, out.stderr[-800:]
