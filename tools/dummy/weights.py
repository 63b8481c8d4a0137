"""Random weights written into shard buffers (host-tier views or GPU buffers) for
`--dummy` benchmarks: packed codes tiled from a random block, plausible scales, layer
norms at 1, biases at 0, embeddings ~N(0, 0.02). The layout comes from the manifest."""

from __future__ import annotations

import concurrent.futures
import functools
import zlib

import torch

from strata.model import manifest

_BLOCK = 16 << 20  # random bytes tiled over packed codes


@functools.lru_cache(maxsize=4)
def _random_block(device: torch.device, seed: int) -> torch.Tensor:
    """The random bytes tiled over packed codes, made once per device (the compute
    node fills its GPU-resident dummy layers one call per layer)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (_BLOCK,), dtype=torch.uint8, generator=g).to(device)


def _fill_part(view: torch.Tensor, local: str, pname: str, entry: manifest.TensorEntry, block: torch.Tensor,
               gen: torch.Generator) -> None:
    if pname == "data" and entry.quant is not None:
        full = view.numel() // block.numel() * block.numel()
        if full:
            view[:full].view(-1, block.numel()).copy_(block.expand(full // block.numel(), -1))
        view[full:].copy_(block[: view.numel() - full])
        return
    t = view.view(getattr(torch, entry.dtype if pname == "data" else "float16"))
    if pname == "scale":
        t.copy_((torch.rand(t.shape, generator=gen, device=t.device) * 0.5 + 0.75) * (0.04 / 2**entry.quant.bits))
    elif pname == "min":
        t.fill_(-0.02)
    elif local.endswith("bias"):
        t.zero_()
    elif "norm" in local or local.startswith("ln_"):
        t.fill_(1.0)
    else:
        t.copy_(torch.randn(t.shape, generator=gen, device=t.device) * 0.02)


def fill(shard_bytes: dict[str, torch.Tensor], m: manifest.Manifest, seed: int = 0, threads: int = 8) -> None:
    """Write random weights into each shard's bytes (uint8 views of the host tier, or
    device buffers: dummy layers made directly on the GPU)."""
    def one(name: str) -> None:
        raw = shard_bytes[name]
        gen = torch.Generator(device=raw.device).manual_seed(seed + zlib.crc32(name.encode()))
        block = _random_block(raw.device, seed)
        for local, entry in m.shards[name].tensors.items():
            for pname, part in entry.parts.items():
                _fill_part(raw[part.offset : part.offset + part.length], local, pname, entry, block, gen)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, shard_bytes))
