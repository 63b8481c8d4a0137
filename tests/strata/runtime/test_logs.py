"""strata/runtime/logs.py: one logging setup, in-process and in a real service process."""

import json
import logging
import os
import pathlib
import secrets
import signal
import subprocess
import sys
import warnings

import grpc
import pytest

from strata.runtime import logs
from strata.transport.wire import common_pb2, kv_store_pb2_grpc

REPO = pathlib.Path(__file__).resolve().parents[3]


@pytest.fixture
def root_logger():
    """setup() replaces the root logger's handlers; put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    logging.captureWarnings(False)


def test_json_lines_name_the_service_level_logger_and_exception(root_logger, capsys):
    logs.setup("kv_store", "info", json_lines=True)
    logging.getLogger("strata.kv_store").info("listening on %s", "unix:///x\ny")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("strata.kv_store").exception("failed")
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 2  # the newline in the message stays inside its line
    first, second = (json.loads(line) for line in lines)
    assert first["service"] == "kv_store" and first["level"] == "info" and first["logger"] == "strata.kv_store"
    assert first["message"] == "listening on unix:///x\ny"
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert second["level"] == "error" and "RuntimeError: boom" in second["exception"]


def test_text_lines_name_the_service_and_drop_records_below_the_level(root_logger, capsys):
    logs.setup("weight_store", "warning")
    log = logging.getLogger("weight_store")
    log.info("not shown")
    log.warning("shown")
    err = capsys.readouterr().err
    assert "not shown" not in err
    assert err.count("\n") == 1 and " weight_store WARNING weight_store: shown" in err


def test_setup_twice_leaves_one_handler(root_logger, capsys):
    logs.setup("compute_node", "debug")
    logs.setup("compute_node", "debug", json_lines=True)
    logging.getLogger("x").debug("once")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["message"] == "once"
    assert root_logger.level == logging.DEBUG


def test_warnings_become_log_lines(root_logger, capsys):
    logs.setup("compute_node", "info", json_lines=True)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("deprecated thing")
    line = json.loads(capsys.readouterr().err.strip())
    assert line["logger"] == "py.warnings" and "deprecated thing" in line["message"]


def test_unknown_level_is_refused(root_logger):
    with pytest.raises(ValueError, match="log level"):
        logs.setup("kv_store", "verbose")


def test_setup_from_argv_takes_out_its_flags_and_keeps_the_rest_in_order(root_logger):
    rest = logs.setup_from_argv("kv_store", ["--listen", "a", "--log-level=debug", "--threads", "2", "--log-json"])
    assert rest == ["--listen", "a", "--threads", "2"]
    assert root_logger.level == logging.DEBUG
    assert isinstance(root_logger.handlers[0].formatter, logs.JsonFormatter)
    assert logs.argv_for("error", True) == ["--log-level", "error", "--log-json"]
    assert logs.setup_from_argv("kv_store", logs.argv_for("error", False)) == []
    assert root_logger.level == logging.ERROR


def run_kv_store(socket: str, *log_flags: str) -> tuple[int, str]:
    """Start the KV store with these flags, wait until it is healthy, SIGTERM it; (exit code, its stderr)."""
    session = "test" + secrets.token_hex(4)
    cmd = [sys.executable, "-m", "kv_store", "--listen", f"unix://{socket}", "--session", session,
           "--capacity-bytes", "100000", "--threads", "1", "--no-preallocate", *log_flags]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        with grpc.insecure_channel(f"unix://{socket}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            assert kv_store_pb2_grpc.KVStoreStub(channel).Health(common_pb2.HealthRequest(), timeout=10).ready
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert out == ""  # logs go to stderr only
    return proc.returncode, err


def test_a_service_logs_json_lines_at_debug_to_stderr(tmp_path):
    socket = str(tmp_path / "kv.sock")
    code, err = run_kv_store(socket, "--log-json", "--log-level", "debug")
    assert code == 0
    lines = [json.loads(line) for line in err.splitlines()]  # every line is one JSON object
    assert {line["service"] for line in lines} == {"kv_store"}
    assert any(line["level"] == "info" and socket in line["message"] for line in lines)  # where it listens


def test_a_service_at_warning_logs_no_info_lines(tmp_path):
    socket = str(tmp_path / "kv.sock")
    code, err = run_kv_store(socket, "--log-level", "warning")
    assert code == 0
    assert socket not in err and " INFO " not in err
    assert all(" kv_store " in line for line in err.splitlines())


def test_a_service_refuses_an_unknown_level():
    proc = subprocess.run([sys.executable, "-m", "kv_store", "--log-level", "loud"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 2 and "--log-level" in proc.stderr
