"""The committed gRPC stubs are what proto/ generates (grpcio-tools pinned to 1.84,
the runtime on the GPU machine)."""

import pathlib

from strata.transport.wire import regen

WIRE = pathlib.Path(regen.__file__).parent


def test_regenerating_the_stubs_changes_nothing(tmp_path):
    written = regen.generate(tmp_path)
    assert {p.name for p in written} == {p.name for p in WIRE.glob("*_pb2*.py")}
    for fresh in written:
        assert fresh.read_text() == (WIRE / fresh.name).read_text(), f"{fresh.name} is stale: run strata/transport/wire/regen.py"


def test_every_rpc_has_its_own_request_and_response():
    import google.protobuf.descriptor_pool as pool

    from strata.transport.wire import generate_pb2, kv_store_pb2, weight_store_pb2  # noqa: F401

    seen = set()
    for name in ("strata.wire.WeightStore", "strata.wire.KVStore", "strata.wire.Generator"):
        for m in pool.Default().FindServiceByName(name).methods:
            for t in (m.input_type.full_name, m.output_type.full_name):
                assert t not in seen or t.endswith("HealthRequest") or t.endswith("HealthResponse"), t
                seen.add(t)
