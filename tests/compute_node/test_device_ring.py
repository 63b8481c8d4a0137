"""The GPU ring of packed layer slots (compute_node/layer_weights.py DeviceRing): every
streamed layer comes back equal to a direct dequantization of its shard, through
several passes (slots reused), an out-of-order request (the ring restarts) and a depth
smaller than the streamed layers. CUDA only: off CUDA, streamed layers are plain
copies (tests/compute_node/test_engine.py covers that schedule)."""

import pytest
import torch

import tiny_models
from compute_node.layer_weights import LayerWeights, dense, to_device
from compute_node.weights import HostWeights
from strata.model.manifest import layer_shard

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the ring is the CUDA path")


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    return HostWeights.from_directory(tiny_models.converted("opt", tmp_path_factory, bits=4, group_size=32)[1])


def expected(host, i, device, dtype):
    return dense(to_device(host.shard(layer_shard(i)), device), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_streamed_layers_equal_their_shards_through_passes_and_a_restart(host, depth, dtype):
    """In float16 the layer norms and biases are stored in the compute dtype: they must
    come back as copies, not views of a slot the next fill overwrites. Each layer is
    checked after the next ones were requested (their fills queued)."""
    device = torch.device("cuda")
    n = host.manifest.num_layers
    lw = LayerWeights(host, device, dtype, {0}, depth=depth)
    order = list(range(n)) * 3 + [n - 1, 1, 2] + list(range(n))  # three passes, a restart at n-1, then at 1
    held = []
    for i in order:
        held.append((i, lw.get(i)))
    torch.cuda.synchronize()
    for i, got in held[-(2 * n):]:
        want = expected(host, i, device, dtype)
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    assert lw.ring is not None and len(lw.ring.slots) == depth
