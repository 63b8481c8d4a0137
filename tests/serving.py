"""Running `strata serve` as a user would: a subprocess, its address read from its
'listening on ADDR' line, stopped with a signal."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import time

import psutil

ROOT = pathlib.Path(__file__).resolve().parents[1]


def strata(*args: str, timeout: float = 300, check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    """`strata ARGS` from the repository root; `env`: variables set over this process's."""
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=check, env={**os.environ, **(env or {})})


def shm_entries(orphans_only: bool = True) -> set[str]:
    """strata-* regions; by default only those whose creating process is gone (another
    run's live regions on the same machine are not ours to judge)."""
    from conftest import _creator_alive

    names = {p.name for p in pathlib.Path("/dev/shm").glob("strata-*")}
    return {n for n in names if not _creator_alive(n)} if orphans_only else names


def device_flags() -> list[str]:
    """STRATA_TEST_DEVICE=cuda runs the end-to-end tests on the GPU (float32, so
    tokens still equal the float32 reference exactly), with the placement pinned
    (all layers resident unless a test says otherwise) rather than planned."""
    device = os.environ.get("STRATA_TEST_DEVICE", "cpu")
    return [] if device == "cpu" else ["--device", device, "--dtype", "float32", "--gpu-weight-share", "1"]


class Server:
    def __init__(self, model_dir, *flags: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", "serve", str(model_dir), "--listen", "127.0.0.1:0", *device_flags(),
             *flags],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + 180
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("listening on ") or self.proc.poll() is not None:
                break
        if not line.startswith("listening on "):
            self.proc.kill()
            raise RuntimeError(f"serve did not start: {line!r} {self.proc.stderr.read()}")
        self.address = line.split("listening on ", 1)[1].strip()
        self.children = [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]

    def child(self, module: str) -> psutil.Process:
        for pid in self.children:
            with contextlib.suppress(psutil.NoSuchProcess):
                p = psutil.Process(pid)
                if module in " ".join(p.cmdline()):
                    return p
        raise LookupError(module)

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.proc.stdout.close()
            self.proc.stderr.close()

    def alive_children(self) -> list[int]:
        return [pid for pid in self.children if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
