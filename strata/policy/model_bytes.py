"""What the planner knows of a model: its dimensions and the bytes its weights take at
each quantization, read from a converted model's manifest, or, for a built-in shape
name (`--dummy` runs), estimated from the converter's layout. `strata plan`, `strata
bench`, `strata serve` and bench/grid.py plan from it."""

from __future__ import annotations

import pathlib
from typing import NamedTuple

from strata.model.arch import ModelDims, dims_for
from strata.policy import cost_model as cm
from strata.policy.planner import WeightBytesFn
from strata.runtime.errors import ErrorKind, StrataError


class PlanModel(NamedTuple):
    dims: ModelDims
    weight_bytes: WeightBytesFn  # quant bits -> stored bytes
    bits: int | None  # the bits the model is stored in (a manifest's), else those asked for (None: any)


def model_for(model: str, bits: int | None, group_size: int) -> PlanModel:
    """`model`: a converted model directory (its manifest's shard sizes; `bits`, when
    given, must be the bits it is stored in) or a shape name such as facebook/opt-30b."""
    path = pathlib.Path(model)
    if (path / "manifest.json").exists():
        from strata.model.manifest import Manifest

        m = Manifest.load(str(path))
        dims = dims_for(m.config)
        stored = int(m.quantization.get("bits", 16))
        sizes = {k: float(s.size) for k, s in m.shards.items()}
        if bits and bits != stored:
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"{model} is stored in {stored} bits, not {bits}")
        return PlanModel(dims, lambda b: cm.weight_bytes_from_shards(sizes, dims, b), stored)
    from strata.model import shapes

    dims = dims_for(shapes.config_for(model))  # a shape name: run with --dummy weights
    return PlanModel(dims, lambda b: cm.estimate_weight_bytes(dims, b, group_size, dummy=True), bits)
