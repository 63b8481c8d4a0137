"""Regenerate the gRPC stubs in this folder from proto/ (grpcio-tools==1.84.0).

The stubs are committed; tests/strata/transport/test_wire.py checks that regenerating
changes nothing. The .proto files sit under proto/strata/transport/wire/ so that the
stubs import each other as `strata.transport.wire`; their protobuf package stays
`strata.wire`, which names the services on the wire (`/strata.wire.Generator/Generate`).
Pinned to 1.84 because the GPU machine runs grpcio 1.84: stubs from a newer generator
refuse to load on an older runtime.
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[3]
PROTO_DIR = ROOT / "proto"
WIRE = pathlib.Path("strata", "transport", "wire")  # the stubs' package, and the protos' folder under proto/


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    from grpc_tools import protoc  # imported here: only needed by developers and tests

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / WIRE).glob("*.proto"))
    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    return sorted((out_dir / WIRE).glob("*_pb2*.py"))


if __name__ == "__main__":
    written = generate(ROOT)
    print("\n".join(str(p) for p in written))
    sys.exit(0)
