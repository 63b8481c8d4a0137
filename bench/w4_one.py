"""Run one W4A16 config a few times (for ncu): python3 bench/w4_one.py N K M 'JSON config'."""
import json
import sys

import torch

from compute_node.kernels import w4a16
from strata.model import quant

n, k, m = (int(v) for v in sys.argv[1:4])
cfg = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
data, scale, mn = quant.random_packed((n, k), 4, 64, device="cuda")
x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
for _ in range(4):
    w4a16.int4_linear(x, data, scale, mn, 64, config=cfg)
torch.cuda.synchronize()
