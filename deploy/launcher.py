"""Starts the three services as separate OS processes on one host, waits until each
is healthy, and stops them cleanly.

Peers talk over Unix sockets in a private run directory; the compute node listens
where the user asked (and on a Unix socket there, for the launcher's health checks).
Children get SIGTERM if the launcher dies (strata/runtime/lifetime.py), and after they stop
the launcher removes every shared-memory region of its session, so nothing is left in
/dev/shm even when a service was killed; a run directory left by a launcher that was
killed is removed by the next one. While serving, `unresponsive()` names a service
that has answered no health check for `health_timeout_s` (a hung one, not only a dead
one). A service's stdout goes to the launcher's stderr: only `strata serve` writes to
its stdout."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import grpc

from strata.policy.run_plan import RunPlan
from strata.runtime import logs
from strata.runtime.errors import ErrorKind, StrataError
from strata.runtime.lifetime import PARENT_ENV, process_alive
from strata.transport import rpc, shm
from strata.transport.wire import common_pb2, generate_pb2_grpc, kv_store_pb2_grpc, weight_store_pb2_grpc


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    model_dir: str
    plan: RunPlan  # placement, KV, batch: resolved once (deploy/serve_plan.py), read by every service
    listen: str = "127.0.0.1:50551"
    device: str = "cpu"
    kv_capacity_bytes: int = 2 << 30
    kv_threads: int = 0  # KV store attention threads; 0 = its default
    kv_attention: str = "native"  # KV store decode attention kernel: native or sdpa
    exchange_bytes: int = 64 << 20  # each of the compute node's two exchange halves, registered at start
    rpc_timeout_s: float = 30.0
    transport: str = "shm"
    start_timeout_s: float = 600.0
    dummy: str = ""  # weight store makes random weights of this shape (bench)
    quant_bits: int = 4
    group_size: int = 64
    http: str = ""  # HOST:PORT of the OpenAI-compatible HTTP gateway (a fourth process); "" = none
    max_request_bytes: int = 64 << 20  # the compute node's largest Generate request
    max_prompt_tokens: int = 0  # 0 = the compute node's default
    max_prompt_chars: int = 0  # 0 = the compute node's default
    prefill_chunk_tokens: int = 0  # prompt tokens through a layer at once; 0 = the compute node's default
    api_key: str = dataclasses.field(default="", repr=False)  # every call to the compute node needs it ("" = none)
    tls_cert: str = ""  # PEM files: the compute node serves --listen over TLS
    tls_key: str = ""
    health_timeout_s: float = 60.0  # a service that answers no health check this long is hung; 0 = only exits
    log_level: str = "info"  # each service's --log-level (strata/runtime/logs.py)
    log_json: bool = False  # each service logs one JSON object per line


class Services:
    def __init__(self, opts: ServeOptions):
        self.opts = opts
        self.session = shm.new_session_id()
        remove_stale_rundirs()
        self.rundir = tempfile.mkdtemp(prefix=f"{RUNDIR_PREFIX}{os.getpid()}-{self.session}-")
        self._health: dict[str, tuple[grpc.Channel, object]] = {}
        self._answered: dict[str, float] = {}
        self._next_check = 0.0
        self.procs: dict[str, subprocess.Popen] = {}
        self.address = ""
        self.http_address = ""

    @property
    def weight_store_addr(self) -> str:
        return f"unix://{self.rundir}/weight_store.sock"

    @property
    def kv_store_addr(self) -> str:
        return f"unix://{self.rundir}/kv_store.sock"

    @property
    def plan_path(self) -> str:
        """The run plan every service reads (`--plan`)."""
        return f"{self.rundir}/plan.json"

    @property
    def control_addr(self) -> str:
        """The compute node's second address: a Unix socket in the run directory, without
        TLS (every call still needs the API key where one is set)."""
        return f"unix://{self.rundir}/compute_node.sock"

    def _spawn(self, name: str, args: list[str], stdout=None) -> None:
        # no preexec_fn: the child asks for its own death signal after exec (strata/runtime/lifetime.py)
        env = dict(os.environ, **{PARENT_ENV: str(os.getpid())})
        env.pop(rpc.API_KEY_ENV, None)
        if self.opts.api_key:  # by environment, not argv (which every user can list)
            env[rpc.API_KEY_ENV] = self.opts.api_key
        stdout = 2 if stdout is None else stdout  # to our stderr: only `strata serve` writes to its stdout
        args = [*args, *logs.argv_for(self.opts.log_level, self.opts.log_json)]
        self.procs[name] = subprocess.Popen([sys.executable, "-m", *args], stdout=stdout, env=env)

    def start(self) -> str:
        o = self.opts
        try:
            rpc.check_free(o.listen)  # before loading anything
            o.plan.save(self.plan_path)
            ws = ["weight_store", "--listen", self.weight_store_addr, "--session", self.session, "--plan", self.plan_path]
            if o.dummy:
                ws += ["--dummy", o.dummy, "--quant-bits", str(o.quant_bits), "--group-size", str(o.group_size)]
            else:
                ws += ["--model", o.model_dir]
            self._spawn("weight store", ws)
            if o.plan.kv_offload:
                kv = ["kv_store", "--listen", self.kv_store_addr, "--session", self.session, "--plan", self.plan_path,
                      "--capacity-bytes", str(o.kv_capacity_bytes)]
                kv += ["--attention", o.kv_attention] + (["--threads", str(o.kv_threads)] if o.kv_threads else [])
                self._spawn("KV store", kv)
            self._wait_healthy("weight store", weight_store_pb2_grpc.WeightStoreStub, self.weight_store_addr)
            if o.plan.kv_offload:
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
        args = ["compute_node", "--listen", o.listen, "--session", self.session, "--plan", self.plan_path,
                "--weight-store", self.weight_store_addr, "--device", o.device,
                "--rpc-timeout", str(o.rpc_timeout_s), "--transport", o.transport]
        if o.plan.kv_offload:
            args += ["--kv-store", self.kv_store_addr, "--exchange-bytes", str(o.exchange_bytes)]
        args += ["--control-listen", self.control_addr, "--max-request-bytes", str(o.max_request_bytes),
                 "--max-prompt-tokens", str(o.max_prompt_tokens), "--max-prompt-chars", str(o.max_prompt_chars),
                 "--prefill-chunk-tokens", str(o.prefill_chunk_tokens)]
        if o.tls_cert:
            args += ["--tls-cert", o.tls_cert, "--tls-key", o.tls_key]
        self._spawn("compute node", args, stdout=subprocess.PIPE)
        proc = self.procs["compute node"]
        line = proc.stdout.readline().decode().strip()  # type: ignore[union-attr]
        if not line.startswith("READY "):
            proc.wait(timeout=30)
            why = line.removeprefix("FAILED ") if line.startswith("FAILED ") else f"exit code {proc.returncode}"
            raise StrataError(ErrorKind.UNAVAILABLE, f"compute node failed to start: {why}")
        return line.split(" ", 1)[1]

    def _start_gateway(self) -> str:
        """The HTTP gateway (gateway/), once the compute node is healthy. It calls the compute
        node on its control socket (no TLS there; the API key, from STRATA_API_KEY in its
        environment, still needed) and serves HTTPS with serve's certificate where one is given."""
        o = self.opts
        args = ["gateway", "--listen", o.http, "--endpoint", self.control_addr, "--model-dir", o.model_dir]
        if o.tls_cert:
            args += ["--tls-cert", o.tls_cert, "--tls-key", o.tls_key]
        self._spawn("gateway", args, stdout=subprocess.PIPE)
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

    def unresponsive(self) -> list[str]:
        """The services (weight store, KV store, compute node) that have answered no
        health check for `health_timeout_s`. Asks all at once at most every quarter of it
        (0.5 to 5 s), each call with that as its deadline; any answer counts, even an
        error, but not a deadline or an unreachable service."""
        timeout = self.opts.health_timeout_s
        now = time.monotonic()
        if not timeout or now < self._next_check:
            return []
        interval = min(5.0, max(0.5, timeout / 4))
        self._next_check = now + interval
        if not self._health:
            self._health = self._health_stubs()
            self._answered = dict.fromkeys(self._health, now)
        calls = {name: stub.Health.future(common_pb2.HealthRequest(), timeout=interval)
                 for name, (_, stub) in self._health.items() if name in self.procs}
        for name, call in calls.items():
            try:
                call.result()
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                    continue
            self._answered[name] = time.monotonic()
        return [name for name in calls if time.monotonic() - self._answered[name] > timeout]

    def _health_stubs(self) -> dict[str, tuple[grpc.Channel, object]]:
        stubs = {}
        for name, address, stub_cls, key in (
            ("weight store", self.weight_store_addr, weight_store_pb2_grpc.WeightStoreStub, ""),
            ("KV store", self.kv_store_addr, kv_store_pb2_grpc.KVStoreStub, ""),
            ("compute node", self.control_addr, generate_pb2_grpc.GeneratorStub, self.opts.api_key),
        ):
            if name in self.procs:
                channel = rpc.channel(address, api_key=key)
                stubs[name] = (channel, stub_cls(channel))
        return stubs

    def stop(self, timeout: float = 15.0) -> None:
        """Gateway, compute node (it holds the peers' regions), then the stores."""
        for name in ("gateway", "compute node", "KV store", "weight store"):
            proc = self.procs.get(name)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.send_signal(signal.SIGCONT)  # a stopped (SIGSTOP) service acts on it too
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        for channel, _ in self._health.values():
            channel.close()
        self._health = {}
        shm.sweep(self.session)
        shutil.rmtree(self.rundir, ignore_errors=True)


RUNDIR_PREFIX = "strata-run-"  # + the launcher's pid + "-" + its session + "-" + a random suffix


def remove_stale_rundirs(parent: str | None = None) -> list[str]:
    """Removes the run directories (ours, under `parent`, default the temporary
    directory) whose launcher is gone, e.g. killed with SIGKILL; returns them."""
    removed = []
    for path in pathlib.Path(parent or tempfile.gettempdir()).glob(f"{RUNDIR_PREFIX}*"):
        try:
            pid = int(path.name[len(RUNDIR_PREFIX):].split("-", 1)[0])
            mine = path.is_dir() and path.stat().st_uid == os.getuid()
        except (ValueError, OSError):
            continue
        if mine and not process_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


