"""Starts the three services as separate OS processes on one host, waits until each
is healthy, and stops them cleanly.

Peers talk over Unix sockets in a private run directory; the compute node listens
where the user asked. Children get SIGTERM if the launcher dies (strata/lifetime.py),
and after they stop the launcher removes every shared-memory region of its session,
so nothing is left in /dev/shm even when a service was killed."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import grpc

from strata import logs, shm
from strata.errors import ErrorKind, StrataError
from strata.lifetime import PARENT_ENV
from strata.wire import common_pb2, kv_store_pb2_grpc, weight_store_pb2_grpc


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    model_dir: str
    listen: str = "127.0.0.1:50551"
    device: str = "cpu"
    kv_offload: bool = False
    kv_bits: int = 16
    kv_capacity_bytes: int = 2 << 30
    kv_threads: int = 0  # KV store attention threads; 0 = its default
    kv_attention: str = "native"  # KV store decode attention kernel: native or sdpa
    exchange_bytes: int = 64 << 20  # each of the compute node's two exchange halves, registered at start
    gpu_weight_share: float = 1.0
    micro_batches: int = 1
    decode_graphs: bool = True  # compute node replays decode steps as CUDA graphs where it can
    dtype: str = ""
    rpc_timeout_s: float = 30.0
    transport: str = "shm"
    start_timeout_s: float = 600.0
    dummy: str = ""  # weight store makes random weights of this shape (bench)
    quant_bits: int = 4
    group_size: int = 64
    disk_offload: bool = False  # streamed layers read from disk every pass
    host_budget_bytes: int = 0  # weights' host tier + staging slots; 0 = no limit
    http: str = ""  # HOST:PORT of the OpenAI-compatible HTTP gateway (a fourth process); "" = none
    log_level: str = "info"  # each service's --log-level (strata/logs.py)
    log_json: bool = False  # each service logs one JSON object per line


class Services:
    def __init__(self, opts: ServeOptions):
        self.opts = opts
        self.session = shm.new_session_id()
        self.rundir = tempfile.mkdtemp(prefix=f"strata-{self.session}-")
        self.procs: dict[str, subprocess.Popen] = {}
        self.address = ""
        self.http_address = ""

    @property
    def weight_store_addr(self) -> str:
        return f"unix://{self.rundir}/weight_store.sock"

    @property
    def kv_store_addr(self) -> str:
        return f"unix://{self.rundir}/kv_store.sock"

    def _spawn(self, name: str, args: list[str], stdout=None) -> None:
        # no preexec_fn: the child asks for its own death signal after exec (strata/lifetime.py)
        env = dict(os.environ, **{PARENT_ENV: str(os.getpid())})
        args = [*args, *logs.argv_for(self.opts.log_level, self.opts.log_json)]
        self.procs[name] = subprocess.Popen([sys.executable, "-m", *args], stdout=stdout, env=env)

    def start(self) -> str:
        o = self.opts
        try:
            ws = ["weight_store", "--model", o.model_dir, "--listen", self.weight_store_addr, "--session", self.session,
                  "--gpu-share", str(o.gpu_weight_share), "--host-budget-gb", str(o.host_budget_bytes / 2**30)]
            if o.disk_offload:
                ws.append("--disk-offload")
            if o.dummy:
                ws += ["--dummy", o.dummy, "--quant-bits", str(o.quant_bits), "--group-size", str(o.group_size)]
            self._spawn("weight store", ws)
            if o.kv_offload:
                kv = ["kv_store", "--listen", self.kv_store_addr, "--session", self.session,
                      "--capacity-bytes", str(o.kv_capacity_bytes)]
                kv += ["--attention", o.kv_attention] + (["--threads", str(o.kv_threads)] if o.kv_threads else [])
                self._spawn("KV store", kv)
            self._wait_healthy("weight store", weight_store_pb2_grpc.WeightStoreStub, self.weight_store_addr)
            if o.kv_offload:
                self._wait_healthy("KV store", kv_store_pb2_grpc.KVStoreStub, self.kv_store_addr)
            self.address = self._start_compute_node()
            if o.http:
                self.http_address = self._start_gateway()
            return self.address
        except BaseException:
            self.stop()
            raise

    def _start_compute_node(self) -> str:
        o = self.opts
        args = ["compute_node", "--listen", o.listen, "--session", self.session,
                "--weight-store", self.weight_store_addr, "--device", o.device,
                "--rpc-timeout", str(o.rpc_timeout_s), "--gpu-weight-share", str(o.gpu_weight_share),
                "--micro-batches", str(o.micro_batches), "--transport", o.transport]
        if o.dtype:
            args += ["--dtype", o.dtype]
        args += ["--kv-bits", str(o.kv_bits)]
        if not o.decode_graphs:
            args.append("--no-decode-graphs")
        if o.kv_offload:
            args += ["--kv-offload", "--kv-store", self.kv_store_addr, "--exchange-bytes", str(o.exchange_bytes)]
        self._spawn("compute node", args, stdout=subprocess.PIPE)
        proc = self.procs["compute node"]
        line = proc.stdout.readline().decode().strip()  # type: ignore[union-attr]
        if not line.startswith("READY "):
            proc.wait(timeout=30)
            raise StrataError(ErrorKind.UNAVAILABLE, f"compute node failed to start (exit code {proc.returncode})")
        return line.split(" ", 1)[1]

    def _start_gateway(self) -> str:
        """The HTTP gateway (gateway/), once the compute node is healthy; it reads the API
        key from STRATA_API_KEY in its environment."""
        o = self.opts
        self._spawn("gateway", ["gateway", "--listen", o.http, "--endpoint", self.address, "--model-dir", o.model_dir],
                    stdout=subprocess.PIPE)
        proc = self.procs["gateway"]
        line = proc.stdout.readline().decode().strip()  # type: ignore[union-attr]
        if not line.startswith("READY "):
            proc.wait(timeout=30)
            raise StrataError(ErrorKind.UNAVAILABLE, f"HTTP gateway failed to start on {o.http} (exit code {proc.returncode})")
        return line.split(" ", 1)[1]

    def _wait_healthy(self, name: str, stub_cls, address: str) -> None:
        deadline = time.monotonic() + self.opts.start_timeout_s
        with grpc.insecure_channel(address) as channel:
            stub = stub_cls(channel)
            while time.monotonic() < deadline:
                proc = self.procs[name]
                if proc.poll() is not None:
                    raise StrataError(ErrorKind.UNAVAILABLE, f"{name} exited during start (exit code {proc.returncode})")
                try:
                    if stub.Health(common_pb2.HealthRequest(), timeout=1.0).ready:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise StrataError(ErrorKind.DEADLINE_EXCEEDED, f"{name} not healthy after {self.opts.start_timeout_s:.0f} s")

    def dead(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is not None]

    def stop(self, timeout: float = 15.0) -> None:
        """Gateway, compute node (it holds the peers' regions), then the stores."""
        for name in ("gateway", "compute node", "KV store", "weight store"):
            proc = self.procs.get(name)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        shm.sweep(self.session)
        shutil.rmtree(self.rundir, ignore_errors=True)
