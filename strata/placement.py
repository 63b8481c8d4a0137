"""Placement policy (no torch): which layers stay resident on the compute device.
The rest stream from the host tier each forward pass."""

from __future__ import annotations


def resident_layers(num_layers: int, gpu_share: float) -> set[int]:
    """round(share * L) resident layers, spread evenly through the model, so that the
    host-to-GPU stream of the others keeps going while resident layers compute
    (resident and streamed layers interleave instead of forming two blocks)."""
    if not 0.0 <= gpu_share <= 1.0:
        raise ValueError(f"GPU weight share must be in [0, 1], got {gpu_share}")
    k = round(gpu_share * num_layers)
    if k == 0:
        return set()
    return {int(j * num_layers / k) for j in range(k)}
