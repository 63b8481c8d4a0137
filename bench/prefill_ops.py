"""Prefill's non-GEMM ops on the GPU at T2's width (OPT-30B, B=128 x 512 tokens): causal
attention by SDPA backend, the residual add and layer norm apart and fused
(kernels/add_norm.py), the query scaling. One JSON line each; ms per call."""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.micro_gpu import timed
from compute_node import model
from compute_node.kernels.add_norm import add_norm, norm


def attention(b: int, heads: int, kv_heads: int, n: int, d: int = 128) -> list[dict]:
    q = torch.randn(b, heads, n, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(b, kv_heads, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    flops = 4 * b * heads * n * n / 2 * d
    rows, ref = [], None
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        def run():
            with sdpa_kernel([getattr(SDPBackend, name)]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=d**-0.5,
                                                      enable_gqa=kv_heads != heads)
        try:
            out = run()
            ms = timed(run, 10) * 1e3
        except Exception as e:  # a backend that refuses the shape
            rows.append({"what": "causal attention", "backend": name, "shape": [b, heads, kv_heads, n, d],
                         "error": str(e)[:200]})
            continue
        ref = out if ref is None else ref
        rows.append({"what": "causal attention", "backend": name, "shape": [b, heads, kv_heads, n, d],
                     "ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1),
                     "max_abs_diff_vs_flash": (out.float() - ref.float()).abs().max().item()})
    return rows


def elementwise(rows: int, width: int, rms: bool) -> list[dict]:
    h, a = (torch.randn(rows, width, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w, b = torch.randn(width, device="cuda", dtype=torch.bfloat16), torch.randn(width, device="cuda", dtype=torch.bfloat16)
    bias = None if rms else b
    gb = rows * width * 2 / 1e9
    def torch_norm(x):
        return model.torch_norm(x, w, bias, 1e-5, rms)

    s, y = add_norm(h, a, w, bias, 1e-5, rms)
    diff = max((s.float() - (h + a).float()).abs().max().item(), (y.float() - torch_norm(h + a).float()).abs().max().item())
    out = []
    for what, fn, passes in (
        ("add", lambda: h + a, 3),
        ("norm", lambda: torch_norm(h), 2),
        ("norm, kernel", lambda: norm(h, w, bias, 1e-5, rms), 2),
        ("add + norm fused", lambda: add_norm(h, a, w, bias, 1e-5, rms), 4),
        ("mul by scalar", lambda: h * 0.088, 2),
    ):
        ms = timed(fn, 10) * 1e3
        out.append({"what": what, "rms": rms, "shape": [rows, width], "ms": round(ms, 3),
                    "tbps": round(passes * gb / ms, 2), **({"max_abs_diff_vs_torch": diff} if "fused" in what else {})})
    return out


def main() -> None:
    rows = []
    rows += attention(128, 56, 56, 512)  # T2's prefill, one layer
    rows += attention(16, 128, 8, 512)  # Llama-3.1-405B's heads
    rows += elementwise(65536, 7168, False)
    rows += elementwise(16384, 16384, True)
    name = torch.cuda.get_device_name()
    for r in rows:
        print(json.dumps({"device": name, **r}))
    for r in rows:
        print(r.get("what"), r.get("backend", ""), r.get("shape"), r.get("ms"), r.get("tflops", r.get("tbps", "")),
              r.get("error", "")[:80], file=sys.stderr)


if __name__ == "__main__":
    main()
