"""Kernel-level measurements on the GPU machine, one JSON line each: pinned copy
bandwidth from a shared-memory region, fused dequantization, dequant+GEMM against
PyTorch's int4pack matmul at decode and prefill sizes."""

from __future__ import annotations

import json
import sys

import torch

from compute_node.kernels import dequantize
from strata.model import quant
from strata.transport import shm


def timed(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / reps


def pinned_copy(nbytes: int = 4 << 30) -> dict:
    region = shm.Region.create(shm.region_name("micro", "copy"), nbytes)
    try:
        torch.cuda.cudart().cudaHostRegister(region.data_ptr(), nbytes, 0)
        src = region.bytes_view(0, nbytes)
        dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        t = timed(lambda: dst.copy_(src, non_blocking=True), 5)
        t_back = timed(lambda: src.copy_(dst, non_blocking=True), 5)
        torch.cuda.cudart().cudaHostUnregister(region.data_ptr())
        return {"what": "shm pinned copy", "h2d_GBps": nbytes / t / 1e9, "d2h_GBps": nbytes / t_back / 1e9}
    finally:
        region.close()


def dequant_and_gemm(out_f: int, in_f: int, ms: list[int]) -> list[dict]:
    w = torch.randn(out_f, in_f, device="cuda") * 0.02
    data, scale, mn = quant.quantize(w, 4, 64)
    rows = []
    t_dq = timed(lambda: dequantize(data, scale, mn, 4, 64, torch.float16))
    dense = dequantize(data, scale, mn, 4, 64, torch.float16)
    ref = quant.dequantize(data, scale, mn, 4, 64, torch.float16)
    err = (dense.float() - ref.float()).abs().max().item()
    rows.append({"what": "dequant int4", "shape": [out_f, in_f], "s": t_dq,
                 "GBps_written": out_f * in_f * 2 / t_dq / 1e9, "max_err_vs_ref": err})
    packed = None
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack(data.contiguous(), 8)  # uint8 [n, k/2], high nibble first
        zeros = (mn.float() + 8 * scale.float())
        sz = torch.stack([scale.float().t(), zeros.t()], dim=-1).contiguous().to(torch.bfloat16)
    except Exception as e:  # noqa: BLE001
        rows.append({"what": "int4pack convert failed", "error": repr(e)[:300]})
    for m in ms:
        x = torch.randn(m, in_f, device="cuda", dtype=torch.float16)
        t_mm = timed(lambda: x @ dense.t())
        t_both = timed(lambda: x @ dequantize(data, scale, mn, 4, 64, torch.float16).t())
        row = {"what": "gemm", "m": m, "shape": [out_f, in_f], "fp16_gemm_s": t_mm, "dequant_gemm_s": t_both,
               "tflops_gemm": 2 * m * out_f * in_f / t_mm / 1e12}
        if packed is not None:
            xb = x.to(torch.bfloat16)
            try:
                t4 = timed(lambda: torch.ops.aten._weight_int4pack_mm(xb, packed, 64, sz))
                y4 = torch.ops.aten._weight_int4pack_mm(xb, packed, 64, sz).float()
                row["int4pack_s"] = t4
                row["int4pack_rel_err"] = ((y4 - (x @ dense.t()).float()).norm() / (x @ dense.t()).float().norm()).item()
            except Exception as e:  # noqa: BLE001
                row["int4pack_error"] = repr(e)[:200]
        rows.append(row)
    return rows


def main() -> None:
    out = []
    for shape in [(7168, 7168), (28672, 7168), (7168, 28672)]:
        out += dequant_and_gemm(*shape, ms=[16, 64, 128, 256])
    for row in out:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
