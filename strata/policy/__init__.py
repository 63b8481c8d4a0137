"""Decisions made before anything runs, from numbers alone: the hardware profile, the
floor and cost models, the memory model, the planner, layer placement and tiers, and
the run plan every service reads. Torch-free and grpc-free as a whole
(tests/strata/policy/test_torch_free.py)."""
