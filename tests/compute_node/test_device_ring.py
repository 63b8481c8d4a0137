"""Streamed layers (compute_node/layer_weights.py): every streamed layer comes back equal
to a direct dequantization of its shard, through several passes (slots reused), an
out-of-order request (the ring restarts) and a depth smaller than the streamed layers.
On mock-cuda and CUDA they go through the ring of packed slots (DeviceRing: copies on
its stream, dequantized on use; on mock-cuda a copy lands only once it is waited for,
and a slot refilled before its reader is done is an error); on the CPU they are dense
copies. The mock's rules themselves are tests/compute_node/test_device.py's."""

import pytest
import torch

import tiny_models
from compute_node.device import device_for
from compute_node.device.mock import MockCudaDevice, MockCudaError
from compute_node.layer_weights import DenseCopies, DeviceRing, LayerWeights, dense, to_device
from compute_node.weights import HostWeights
from strata.model.manifest import layer_shard

DEVICES = ["cpu", "mock-cuda",
           pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA"))]


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    return HostWeights.from_directory(tiny_models.converted("opt", tmp_path_factory, bits=4, group_size=32)[1])


def expected(host, i, device, dtype):
    return dense(to_device(host.shard(layer_shard(i)), device), dtype)


@pytest.mark.parametrize("name", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_streamed_layers_equal_their_shards_through_passes_and_a_restart(host, depth, dtype, name):
    """In float16 the layer norms and biases are stored in the compute dtype: they must
    come back as copies, not views of a slot the next fill overwrites. Each layer is
    checked after the next ones were requested (their fills queued)."""
    dev = device_for(name)
    n = host.manifest.num_layers
    lw = LayerWeights(host, dev, dtype, {0}, depth=depth)
    order = list(range(n)) * 3 + [n - 1, 1, 2] + list(range(n))  # three passes, a restart at n-1, then at 1
    held = []
    for i in order:
        held.append((i, lw.get(i)))
    dev.synchronize()
    for i, got in held[-(2 * n):]:
        want = expected(host, i, dev.torch_device, dtype)
        assert got.keys() == want.keys()
        for name_ in want:
            torch.testing.assert_close(got[name_], want[name_], rtol=0, atol=0)
    if dev.streams_ring:
        assert isinstance(lw.loader, DeviceRing) and len(lw.loader.slots) == depth
    else:
        assert isinstance(lw.loader, DenseCopies)


def test_the_mock_ring_copies_on_its_stream_and_waits_before_each_use_and_refill(host):
    """The order the CUDA ring relies on, from the mock's log: each fill is a copy on
    the ring's stream then a record; each use waits for that record on the compute
    stream (the copy runs at that wait); a refill of a used slot waits for the compute stream's
    event after the dequant (`consumed`)."""
    dev = MockCudaDevice()
    lw = LayerWeights(host, dev, torch.float32, {0}, depth=1)
    lw.get(1)
    lw.get(2)
    ring = lw.loader.stream.name
    kinds = [(e[0], e[1]) for e in dev.log if e[0] in ("copy", "record", "wait", "ran")]
    assert kinds[:4] == [("copy", ring), ("record", ring), ("ran", ring), ("wait", "compute")]
    # after layer 1's dequant: its consumed event, then the ring waits for it before layer 2's copy
    assert kinds[4:7] == [("record", "compute"), ("wait", ring), ("copy", ring)]


def test_a_slot_refilled_before_its_dequant_is_done_is_an_error_on_the_mock(host):
    dev = MockCudaDevice()
    ring = DeviceRing(dev, 1, host.manifest.shards[layer_shard(1)].size)
    shard = host.manifest.shards[layer_shard(1)]
    ring.use(*ring.fill(host.raw(layer_shard(1))), shard, torch.float32)
    ring.consumed[0] = None  # forget the dequant's event, as a ring without it would
    with pytest.raises(MockCudaError, match="without waiting"):
        ring.fill(host.raw(layer_shard(2)))


def test_a_slot_read_without_waiting_for_its_copy_holds_the_old_bytes_on_the_mock(host):
    dev = MockCudaDevice()
    ring = DeviceRing(dev, 1, host.manifest.shards[layer_shard(1)].size)
    ring.slots[0].zero_()
    k, copied = ring.fill(host.raw(layer_shard(1)))
    raw = host.raw(layer_shard(1))
    assert not torch.equal(ring.slots[k][: raw.numel()], raw)  # the copy is queued, not done
    dev.current_stream().wait_event(copied)
    assert torch.equal(ring.slots[k][: raw.numel()], raw)
