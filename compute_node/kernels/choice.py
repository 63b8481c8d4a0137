"""Which CUDA W4A16 kernels the compute node may run, decided once at its start.

The run plan (strata/policy/run_plan.py: `w4a16_wgmma`, `w4a16_mma`) says which kernels are
allowed; `on_device` keeps those built for the compute device (building them then:
nvcc's first builds take seconds, at start and not in a request). The result is a
frozen `KernelChoice` handed to the layers (compute_node/layer_weights.py ->
`PackedInt4`), and `int4_linear` caches its per-shape decision under it
(w4a16.decide): nothing is read from the environment per matmul.

At 33-64 rows the allowed kernels are tried in the order wgmma (w4a16_wgmma.cu, sm_90a),
then mma.sync (w4a16_mma.cu, sm_80+), at 65-128 rows the same (wgmma in one call,
mma.sync in 64-row chunks); where none takes the problem the Triton kernel runs. The
compute node reports the choice in Stats as kernel:w4a16_wgmma and kernel:w4a16_mma
(compute_node/metrics.py)."""

from __future__ import annotations

import dataclasses

from compute_node.kernels import w4a16_mma, w4a16_wgmma

MODULES = {"wgmma": w4a16_wgmma, "mma": w4a16_mma}  # in the order they are tried


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    wgmma: bool = True  # the wgmma kernel (w4a16_wgmma.cu) may run
    mma: bool = True  # the mma.sync kernel (w4a16_mma.cu) may run

    def __post_init__(self):
        for name in MODULES:
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"KernelChoice.{name} must be a bool, got {getattr(self, name)!r}")

    @classmethod
    def from_plan(cls, plan) -> KernelChoice:
        """The kernels a run plan allows (before the device has its say)."""
        return cls(wgmma=plan.w4a16_wgmma, mma=plan.w4a16_mma)

    def on_device(self, device) -> KernelChoice:
        """The allowed kernels that are built for `device` (built now where they are
        not yet); none off CUDA."""
        if getattr(device, "type", None) != "cuda":
            return KernelChoice(wgmma=False, mma=False)
        return KernelChoice(**{name: getattr(self, name) and MODULES[name].prepare(device) for name in MODULES})

    @property
    def names(self) -> tuple[str, ...]:
        """The allowed kernels, in the order they are tried."""
        return tuple(name for name in MODULES if getattr(self, name))

    def takes_shape(self, n: int, k: int, group_size: int) -> bool:
        """Whether an allowed kernel takes an [N, K] weight in groups of `group_size` at
        all (the tensors' own checks, e.g. alignment, come per call)."""
        return bool(self.names) and w4a16_mma.shape_fits(n, k, group_size)

    def report(self) -> dict[str, bool]:
        """Stats' kernel:<name> values: which CUDA kernels the node runs."""
        return {f"w4a16_{name}": getattr(self, name) for name in MODULES}


DEFAULT = KernelChoice()  # direct callers of int4_linear (benches, tests): both, where built for the device
NONE = KernelChoice(wgmma=False, mma=False)  # the Triton kernel everywhere
