"""The CUDA paths through `strata serve --device mock-cuda` (three real OS processes): a
6-layer INT4 Llama with 2 layers resident and 4 streamed through the packed ring
(deeper than the ring: slots reused within a pass), the last 2 of those read from disk
into staging slots every pass (each slot given back after its copy's event), and the
KV cache in the KV store (keys and values copied out on the offload stream, each
append sent after its event), two micro-batches. Two calls at once join one batch; their
greedy tokens are transformers' on the same weights. The mock device raises on any
ordering rule broken (compute_node/device/mock.py), which fails the calls. Where a GPU
is present, the same run on `--device cuda`."""

import shutil
import threading

import grpc
import pytest
import torch

import tiny_models
from deploy.client import generate, request_for
from serving import Server
from strata.model import arch, quant
from strata.model.manifest import Manifest
from strata.policy.placement import host_budget_for
from strata.transport.wire import generate_pb2, generate_pb2_grpc
from tools.convert import convert
from weight_store.host_tier import shard_sizes

GROUP = 32
LAYERS, SHARE, DISK = 6, 0.34, 2  # 2 resident, 4 streamed, the last 2 of them from disk
PROMPTS = [[[5, 17, 33, 100, 7, 9], [44, 3, 250]], [[12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]]
NEW = 7


@pytest.fixture(scope="module")
def int4_llama(tmp_path_factory):
    """A tiny Llama whose layer linears are exactly INT4 already (quantized and
    dequantized once, kept in float32): its INT4 conversion holds the same weights, so
    served greedy tokens must be transformers'. (hf dir, INT4 shards)."""
    base = tmp_path_factory.mktemp("llama-int4")
    raw = tiny_models.make_llama(base / "raw", num_hidden_layers=LAYERS)
    model = tiny_models.load_reference(raw)
    spec = arch.spec_for(model.config.to_dict())
    with torch.no_grad():
        for name, p in model.named_parameters():
            kind, _, local = spec.split_name(name)
            if kind == "layer" and local in spec.linears and quant.quantizable(p.shape, GROUP):
                p.copy_(quant.dequantize(*quant.quantize(p, 4, GROUP), 4, GROUP, torch.float32))
    hf = base / "hf"
    model.save_pretrained(hf, safe_serialization=True)
    shutil.copy(raw / "tokenizer.json", hf / "tokenizer.json")
    convert(hf, base / "q4", bits=4, group_size=GROUP)
    return hf, base / "q4"


@pytest.mark.parametrize("device", ["mock-cuda", pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="the same paths on a GPU"))])
def test_int4_layers_through_the_ring_and_kv_offload_give_transformers_tokens(int4_llama, device):
    hf, shards = int4_llama
    expected = [tiny_models.greedy_reference(hf, prompts, NEW) for prompts in PROMPTS]
    budget = host_budget_for(shard_sizes(Manifest.load(shards)), LAYERS, SHARE, DISK) / 2**30
    server = Server(shards, "--device", device, "--dtype", "float32", "--kv-offload", "--gpu-weight-share",
                    str(SHARE), "--host-budget-gb", repr(budget), "--micro-batches", "2", "--max-batch", "4",
                    "--max-seq-len", "32")
    got: list = [None] * len(PROMPTS)

    def call(i):
        got[i] = generate(server.address, request_for(PROMPTS[i], NEW, stop_at_eos=False), timeout=120).tokens

    try:
        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        with grpc.insecure_channel(server.address) as ch:
            stats = dict(generate_pb2_grpc.GeneratorStub(ch).Stats(generate_pb2.StatsRequest(), timeout=5).values)
    finally:
        assert server.stop() == 0
    assert got == expected
    assert stats["plan_resident_layers"] == LAYERS - 4 and stats["requests_total:ok"] == len(PROMPTS)
    assert stats["decode_graphs"] == 0.0  # layers stream: no fixed-shape steps
