"""Device kernels with a plain-PyTorch fallback: the CPU and any device without
Triton run strata.quant's reference code."""

from compute_node.kernels.dequant import dequantize

__all__ = ["dequantize"]
