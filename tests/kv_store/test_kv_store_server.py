import os
import pathlib
import secrets
import signal
import subprocess
import sys

import grpc
import pytest
import torch

from kv_store.group_cache import GroupCache, GroupSpec
from strata.transport.dataplane import inline_ref, ref_for
from strata.transport.shm import Region
from strata.transport.wire import common_pb2, kv_store_pb2, kv_store_pb2_grpc

REPO = pathlib.Path(__file__).resolve().parents[2]
CAPACITY = 200_000
SHAPE = dict(num_layers=2, batch=2, num_heads=4, head_dim=8, max_tokens=16)


class KVProcess:
    """The KV store in its own process, with a stub to it."""

    def __init__(self, capacity: int = CAPACITY, *extra: str):
        self.session = "test" + secrets.token_hex(4)
        self.socket = f"/tmp/strata-kv-{self.session}.sock"
        env = dict(os.environ, PYTHONPATH=str(REPO))
        cmd = [sys.executable, "-m", "kv_store", "--listen", f"unix://{self.socket}", "--session", self.session,
               "--capacity-bytes", str(capacity), "--threads", "1", *extra]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        try:
            grpc.channel_ready_future(self.channel).result(timeout=30)
        except grpc.FutureTimeoutError:
            self.proc.kill()
            pytest.fail(f"KV store did not start: {self.proc.communicate()[1]}")
        self.stub = kv_store_pb2_grpc.KVStoreStub(self.channel)

    def stop(self) -> int:
        self.channel.close()
        self.proc.send_signal(signal.SIGTERM)
        self.log = self.proc.communicate(timeout=30)[1]  # its stderr: the log
        return self.proc.returncode


@pytest.fixture(scope="module")
def kv():
    server = KVProcess()
    yield server
    if server.proc.poll() is None:
        server.stop()


@pytest.fixture
def region(kv):
    r = Region.create(f"strata-{kv.session}-x", 1 << 16)
    kv.stub.RegisterRegion(common_pb2.RegisterRegionRequest(name=r.name, byte_size=r.size))
    yield r
    kv.stub.UnregisterRegion(common_pb2.UnregisterRegionRequest(name=r.name))
    r.close()
    assert not list(pathlib.Path("/dev/shm").glob(f"strata-{kv.session}-*"))


def allocate(kv, group: str, **kw):
    alibi = kv_store_pb2.POSITION_BIAS_ALIBI
    fields = dict(SHAPE, group=group, dtype="float32", scale=8**-0.5, position_bias=alibi, pad=[0, 3])
    fields.update(kw)
    return kv.stub.Allocate(kv_store_pb2.AllocateRequest(**fields))


def attend_inline(group: str, layer: int, q, k, v) -> kv_store_pb2.AttendRequest:
    refs = dict(query=inline_ref(q), key=inline_ref(k), value=inline_ref(v))
    return kv_store_pb2.AttendRequest(group=group, layer=layer, **refs)


def random_qkv(tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, tokens, 8, generator=g) for _ in range(3)]


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


def test_health_reports_ready(kv):
    reply = kv.stub.Health(common_pb2.HealthRequest())
    assert reply.ready and reply.service == "kv_store"


def test_attend_through_shared_memory_and_inline_bytes_agree(kv, region):
    spec = GroupSpec(**SHAPE, dtype=torch.float32, scale=8**-0.5, alibi=True, pad=(0, 3))
    local = GroupCache(spec)
    _, pk, pv = random_qkv(5, seed=1)
    local.append(0, pk, pv)
    for group in ("shm", "inline"):
        reply = allocate(kv, group)
        assert reply.bytes_reserved == 2 * 2 * 2 * 4 * 16 * 8 * 4
    # prefill: through the region for one group, inline for the other
    region.tensor(0, torch.float32, pk.shape).copy_(pk)
    region.tensor(pk.numel() * 4, torch.float32, pv.shape).copy_(pv)
    key_ref, value_ref = ref_for(region, 0, pk), ref_for(region, pk.numel() * 4, pv)
    shm_append = kv_store_pb2.AppendRequest(group="shm", layer=0, key=key_ref, value=value_ref)
    assert kv.stub.Append(shm_append).length == 5
    inline_append = kv_store_pb2.AppendRequest(group="inline", layer=0, key=inline_ref(pk), value=inline_ref(pv))
    assert kv.stub.Append(inline_append).length == 5
    for step in range(3):
        q, k, v = random_qkv(1, seed=10 + step)
        expected = local.attend(0, q, k, v)
        views = [region.tensor(i * 256, torch.float32, q.shape) for i in range(4)]
        for view, t in zip(views, (q, k, v)):
            view.copy_(t)
        refs = [ref_for(region, i * 256, q) for i in range(4)]
        views[3].fill_(float("nan"))
        request = kv_store_pb2.AttendRequest(
            group="shm", layer=0, query=refs[0], key=refs[1], value=refs[2], output=refs[3]
        )
        shm = kv.stub.Attend(request)
        assert shm.length == 6 + step and shm.output.region == region.name
        torch.testing.assert_close(views[3], expected, rtol=1e-6, atol=1e-6)
        inline = kv.stub.Attend(attend_inline("inline", 0, q, k, v))
        assert inline.length == 6 + step and not inline.output.region
        out = torch.frombuffer(bytearray(inline.output.inline_data), dtype=torch.float32)
        out = out.view(list(inline.output.shape))
        assert torch.equal(out, views[3])
    for group in ("shm", "inline"):
        kv.stub.Free(kv_store_pb2.FreeRequest(group=group))


def test_concurrent_attends_on_groups_are_serialized_per_group(kv):
    from concurrent.futures import ThreadPoolExecutor

    for group in ("c0", "c1"):
        allocate(kv, group, max_tokens=16)
    q, k, v = random_qkv(1, seed=3)
    requests = [attend_inline(f"c{i % 2}", 1, q, k, v) for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        lengths = sorted(reply.length for reply in pool.map(kv.stub.Attend, requests))
    assert lengths == sorted(list(range(1, 9)) * 2)
    for group in ("c0", "c1"):
        kv.stub.Free(kv_store_pb2.FreeRequest(group=group))


def test_free_returns_capacity(kv):
    before = allocate(kv, "f").bytes_free
    assert kv.stub.Free(kv_store_pb2.FreeRequest(group="f")).bytes_free == CAPACITY
    assert before == CAPACITY - 2 * 2 * 2 * 4 * 16 * 8 * 4


def test_allocation_beyond_capacity_is_resource_exhausted(kv):
    assert code_of(lambda: allocate(kv, "big", max_tokens=1000)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert kv.stub.Health(common_pb2.HealthRequest()).detail.startswith(f"{CAPACITY} of")


def test_append_beyond_max_tokens_is_resource_exhausted(kv):
    allocate(kv, "full", max_tokens=4)
    x = torch.zeros(2, 4, 5, 8)
    request = kv_store_pb2.AppendRequest(group="full", layer=1, key=inline_ref(x), value=inline_ref(x))
    assert code_of(lambda: kv.stub.Append(request)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    kv.stub.Free(kv_store_pb2.FreeRequest(group="full"))


def test_duplicate_group_is_failed_precondition(kv):
    allocate(kv, "dup")
    assert code_of(lambda: allocate(kv, "dup")) == grpc.StatusCode.FAILED_PRECONDITION
    kv.stub.Free(kv_store_pb2.FreeRequest(group="dup"))


def test_bad_shapes_and_requests_are_invalid_argument(kv):
    allocate(kv, "bad")
    q, k, v = random_qkv(1, seed=0)
    wrong = inline_ref(torch.zeros(2, 4, 1, 7))
    for request in (
        kv_store_pb2.AttendRequest(group="bad", layer=0, query=wrong, key=inline_ref(k), value=inline_ref(v)),
        attend_inline("bad", 0, q.half(), k, v),
        attend_inline("bad", 5, q, k, v),
    ):
        assert code_of(lambda: kv.stub.Attend(request)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: allocate(kv, "badpad", pad=[1])) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: allocate(kv, "baddtype", dtype="int64")) == grpc.StatusCode.INVALID_ARGUMENT
    kv.stub.Free(kv_store_pb2.FreeRequest(group="bad"))


def test_unknown_group_is_not_found(kv):
    q, k, v = random_qkv(1, seed=0)
    attend = attend_inline("nope", 0, q, k, v)
    assert code_of(lambda: kv.stub.Attend(attend)) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: kv.stub.Free(kv_store_pb2.FreeRequest(group="nope"))) == grpc.StatusCode.NOT_FOUND


def test_unregister_unknown_region_is_not_found(kv):
    request = common_pb2.UnregisterRegionRequest(name=f"strata-{kv.session}-missing")
    assert code_of(lambda: kv.stub.UnregisterRegion(request)) == grpc.StatusCode.NOT_FOUND


def test_sigterm_exits_zero_with_a_region_registered():
    server = KVProcess()
    region = Region.create(f"strata-{server.session}-y", 4096)
    try:
        register = common_pb2.RegisterRegionRequest(name=region.name, byte_size=region.size)
        server.stub.RegisterRegion(register)
        allocate(server, "live")
        _, k, v = random_qkv(5, seed=1)
        server.stub.Append(kv_store_pb2.AppendRequest(group="live", layer=0, key=inline_ref(k), value=inline_ref(v)))
        server.stub.Attend(attend_inline("live", 0, *random_qkv(1, seed=2)))
        assert server.stop() == 0
    finally:
        region.close()
    # the arena's pages at start; at stop, the group still allocated with what its one
    # attend read: 2 rows x 6 tokens x (K and V of 4 heads x 8 float32)
    assert "KV arena faulted in" in server.log and "on huge pages" in server.log
    assert "group live still allocated at stop: 1 attends" in server.log
    assert f"({2 * 6 * 2 * 4 * 8 * 4 / 1e9:.4g} GB of cache read" in server.log
    assert not os.path.exists(server.socket)
    assert not list(pathlib.Path("/dev/shm").glob(f"strata-{server.session}-*"))


def test_a_run_plan_admits_only_groups_of_its_kv_bits(tmp_path):
    """--plan: the KV store takes groups at the plan's bits and group size only, and says so."""
    from strata.policy.run_plan import RunPlan

    path = tmp_path / "plan.json"
    RunPlan(num_layers=2, kv_home="kv_store", kv_bits=8, kv_group_size=8).save(path)
    server = KVProcess(CAPACITY, "--plan", str(path))
    try:
        assert "plan: KV at 8 bits in groups of 8" in server.stub.Health(common_pb2.HealthRequest()).detail
        allocate(server, "q8", kv_bits=8, kv_group_size=8, position_bias=kv_store_pb2.POSITION_BIAS_NONE, pad=[])
        with pytest.raises(grpc.RpcError) as e:
            allocate(server, "b16")
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "the run plan's KV cache is at 8 bits" in e.value.details()
    finally:
        assert server.stop() == 0


def test_the_run_plan_s_kernel_macros_build_the_attention_kernel(monkeypatch):
    """The KV store's attention kernel is built with the plan's kv_kernel_defines (bench
    configuration), none without a plan."""
    from kv_store import server
    from strata.policy.run_plan import RunPlan
    from strata.runtime.config import KVStoreConfig

    asked = []
    monkeypatch.setattr(server.NativeDecodeAttention, "create",
                        classmethod(lambda cls, threads, defines=(): asked.append(defines)))
    plan = RunPlan(num_layers=2, kv_home="kv_store", kv_kernel_defines={"PF_TOKENS": 0, "PF_HINT": 2})
    for p in (plan, None):
        s = server.KVStoreServicer(KVStoreConfig(listen="unix:///unused", session="s", capacity_bytes=CAPACITY,
                                                 preallocate=False, plan=p))
        s.close()
    assert asked == [(("PF_HINT", 2), ("PF_TOKENS", 0)), ()]
