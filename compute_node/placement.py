"""Placement policy (no torch): which layers stay resident on the compute device.
The rest stream from the host tier each forward pass."""

from __future__ import annotations


def resident_layers(num_layers: int, gpu_share: float) -> set[int]:
    """The first round(share * L) layers stay resident: layer 0 is needed first each
    pass, so the stream of the others can start while it computes."""
    if not 0.0 <= gpu_share <= 1.0:
        raise ValueError(f"GPU weight share must be in [0, 1], got {gpu_share}")
    return set(range(round(gpu_share * num_layers)))
