"""Host-to-GPU copy rate from a large shared-memory region registered with CUDA, as
the host tier is (filled by many threads, so its pages lie on every NUMA node),
against a small pinned buffer. Prints one JSON line.

    python3 bench/h2d_big.py [--gib 32] [--piece-mib 1024]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from strata.transport import shm  # noqa: E402


def rate(src_views: list[torch.Tensor], dst: torch.Tensor) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for v in src_views:
        dst[: v.numel()].copy_(v, non_blocking=True)
    torch.cuda.synchronize()
    return sum(v.numel() for v in src_views) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=int, default=32)
    ap.add_argument("--piece-mib", type=int, default=1024)
    a = ap.parse_args()
    piece = a.piece_mib << 20
    dst = torch.empty(piece, dtype=torch.uint8, device="cuda")
    small = torch.empty(piece, dtype=torch.uint8, pin_memory=True)
    small.fill_(1)
    out = {"small_pinned_gbps": rate([small] * 8, dst) / 1e9}
    region = shm.Region.create(shm.region_name("h2dbench" + shm.new_session_id(), "big"), a.gib << 30)
    try:
        big = region.bytes_view(0, a.gib << 30)
        torch.set_num_threads(16)
        t0 = time.perf_counter()
        big.fill_(1)  # parallel first touch: pages on every node
        out["fill_s"] = time.perf_counter() - t0
        cudart = torch.cuda.cudart()
        assert int(cudart.cudaHostRegister(region.data_ptr(), region.size, 0)) == 0
        n = (a.gib << 30) // piece
        views = [big[i * piece:(i + 1) * piece] for i in range(n)]
        out["big_region_gbps"] = rate(views, dst) / 1e9
        out["big_region_first_half_gbps"] = rate(views[: n // 2], dst) / 1e9
        out["big_region_second_half_gbps"] = rate(views[n // 2:], dst) / 1e9
        cudart.cudaHostUnregister(region.data_ptr())
    finally:
        region.close()
    out.update(gib=a.gib, piece_mib=a.piece_mib, device=torch.cuda.get_device_name(0))
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
