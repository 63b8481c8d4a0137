"""Kernel benchmark of the compute node's decode attention over its GPU KV cache against
HBM bandwidth: the fused kernel (compute_node/kernels/decode_attention.py) and the path
before it (kv_cache.read_rows, which rebuilds a quantized layer in the compute dtype,
then model.attend's two GEMVs over a mask), through LocalSlots' own layer stores.

`python -m tools.bench_gpu_attention --rows 128 --heads 56 --kv-heads 56 --head-dim 128
--columns 544 --kv-bits 16,8,4` prints one JSON line per precision and path: `ms` per
layer call, `bytes` the layer's K and V as stored (codes plus scales and mins), `gbps`
those bytes over the time, and `hbm_gbps` a device-to-device copy's rate measured in
the same run (read plus write over the time)."""

from __future__ import annotations

import argparse
import datetime
import json

import torch

from compute_node.kernels import decode_attention as da
from compute_node.kv_cache import _PlainLayers, _QuantLayers
from compute_node.model import attend
from compute_node.slot_kv import _LayersShape
from strata.model.kv_quant import KVFormat, default_group


def _time(fn, repeats: int) -> float:
    """Seconds per call, CUDA events over `repeats` calls after a warm-up."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def hbm_gbps() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() / _time(lambda: y.copy_(x), 20) / 1e9


def run(a, bits: int) -> list[dict]:
    dev, dtype = torch.device("cuda"), torch.bfloat16
    pad = torch.zeros(a.rows, dtype=torch.long)
    shape = _LayersShape(1, a.kv_heads, a.columns, a.head_dim, pad)
    if bits == 16:
        layers = _PlainLayers(shape, dtype, dev)
    else:
        layers = _QuantLayers(shape, dtype, dev, KVFormat(bits, a.head_dim, default_group(a.head_dim)), whole=True)
    kv = torch.randn(a.rows, a.kv_heads, a.columns, a.head_dim, dtype=dtype, device=dev)
    layers.write_rows(0, list(range(a.rows)), kv, kv)
    nbytes = layers.nbytes
    q = torch.randn(a.rows, a.heads, 1, a.head_dim, dtype=dtype, device=dev)
    limit = torch.full((a.rows,), a.columns - 1, dtype=torch.long, device=dev)
    bias = torch.zeros(a.rows, 1, 1, a.columns, dtype=dtype, device=dev)
    kp, vp = layers.planes(0)
    scale = a.head_dim ** -0.5

    def fused():
        return da.decode_attention(q, kp, vp, limit, a.columns, scale)

    def before():
        keys, values = layers.read_rows(0, a.rows, a.columns)
        return attend(q, keys, values, bias, scale, gemv=True)

    err = (fused().float() - before().float()).abs().max().item()
    out = []
    for name, fn in (("fused", fused), ("before", before)):
        s = _time(fn, a.repeats)
        out.append({"path": name, "kv_bits": bits, "rows": a.rows, "heads": a.heads, "kv_heads": a.kv_heads,
                    "head_dim": a.head_dim, "columns": a.columns, "qblock": da.QBLOCK_N.get(bits),
                    "ms": round(s * 1e3, 4), "bytes": nbytes,
                    "gbps": round(nbytes / s / 1e9, 1), "max_abs_diff_vs_before": err})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--heads", type=int, default=56)
    ap.add_argument("--kv-heads", type=int, default=56)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--columns", type=int, default=544)
    ap.add_argument("--kv-bits", default="16,8,4")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--qblock", type=int, default=0, help="columns per loop step over a quantized cache (0: the module's)")
    a = ap.parse_args()
    if a.qblock:
        da.QBLOCK_N = {8: a.qblock, 4: a.qblock}
    hbm = round(hbm_gbps(), 1)
    meta = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "hbm_gbps": hbm}
    for bits in (int(b) for b in a.kv_bits.split(",")):
        for line in run(a, bits):
            print(json.dumps({**line, **meta, "of_hbm": round(line["gbps"] / hbm, 3)}), flush=True)


if __name__ == "__main__":
    main()
