"""Where the wgmma W4A16 kernel puts things (a debugging aid for w4a16_wgmma.cu): with X
one-hot, row i = e_j, the kernel's Y[i] should be weight column j. Prints, for sample
(i, j), the X row and weight column that Y[i] matches best, and the error.
usage: python3 bench/wgmma_probe.py [wg tm stages split]"""
import sys

import torch

from compute_node.kernels import w4a16_wgmma
from strata import quant

wg, tm, stages, split = (int(v) for v in (sys.argv[1:5] if len(sys.argv) > 4 else (2, 2, 4, 1)))
n, k, m = 64 * wg * tm, 512, 64
torch.manual_seed(0)
data, scale, w_min = (t.cuda() for t in quant.quantize(torch.randn(n, k) * 0.05, 4, 64))
w = quant.dequantize(data, scale, w_min, 4, 64, out_dtype=torch.float32)  # [N, K]
js = [(i * 37 + 5) % k for i in range(m)]
x = torch.zeros(m, k, dtype=torch.bfloat16, device="cuda")
for i, j in enumerate(js):
    x[i, j] = 1
y = w4a16_wgmma.linear(x, data, scale, w_min, None, 132, wg, tm, stages, split).float()
ref = x.float() @ w.t()
print("max err", (y - ref).abs().max().item(), "ref max", ref.abs().max().item())
for i in list(range(0, 64, 7)) + [63]:
    d = (y[i][None, :] - w.t()).abs().amax(1)  # against every weight column (a k)
    kbest = int(d.argmin())
    rbest = int((y[i][None, :] - ref).abs().amax(1).argmin())
    col_err = (y[i] - ref[i]).abs()
    print(f"row {i:2d} j {js[i]:3d}: best k {kbest:3d} (err {d.min().item():.3g}), best ref row {rbest:2d}, "
          f"bad columns {int((col_err > 1e-2).sum())} first {col_err.gt(1e-2).nonzero().flatten()[:8].tolist()}")
