"""Device kernels with a plain-PyTorch fallback: the CPU and any device without
Triton run strata.model.quant's reference code."""

from compute_node.kernels.dequant import dequantize
from compute_node.kernels.w4a16 import MERGED_QKV, PackedInt4

__all__ = ["MERGED_QKV", "PackedInt4", "dequantize"]
