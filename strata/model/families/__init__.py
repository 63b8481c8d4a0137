"""One module per model family, each defining `SPEC` (a `strata.model.arch.ArchSpec`).

strata/model/arch.py lists this package and registers every module's SPEC for its
model_types: adding a family is adding one module here. The converter, the compute
node (compute_node/model.py interprets `SPEC.math`) and the KV store read nothing else.
Modules here are plain data: no torch, no transformers.

A new family usually needs only names and flags. Check it against transformers with
a tiny checkpoint, as tests/compute_node/test_engine.py and test_family_spec.py do.
"""
