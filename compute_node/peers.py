"""gRPC clients for the compute node's two peers. Every call has a deadline and a
peer's failure becomes a StrataError naming the peer (strata/runtime/errors.py), so a dead
weight store or KV store fails a Generate within the deadline instead of hanging."""

from __future__ import annotations

import grpc

from strata.model.manifest import Manifest
from strata.runtime.errors import from_rpc_error
from strata.transport.wire import common_pb2, kv_store_pb2, kv_store_pb2_grpc, weight_store_pb2, weight_store_pb2_grpc

MAX_MESSAGE = 1 << 30
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]


class _Peer:
    name = "peer"

    def __init__(self, address: str, timeout_s: float):
        self.address = address
        self.timeout_s = timeout_s
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)

    def _call(self, method, request, timeout: float | None = None):
        try:
            return method(request, timeout=timeout or self.timeout_s)
        except grpc.RpcError as e:
            raise from_rpc_error(e, f"{self.name} at {self.address}") from None

    def _future(self, method, request):
        return method.future(request, timeout=self.timeout_s)

    def result(self, future):
        try:
            return future.result()
        except grpc.RpcError as e:
            raise from_rpc_error(e, f"{self.name} at {self.address}") from None

    def health(self, timeout: float = 2.0) -> common_pb2.HealthResponse:
        """Every service's Health (each subclass sets self.stub)."""
        return self._call(self.stub.Health, common_pb2.HealthRequest(), timeout)

    def close(self) -> None:
        self.channel.close()


class WeightStoreClient(_Peer):
    name = "weight store"

    def __init__(self, address: str, timeout_s: float):
        super().__init__(address, timeout_s)
        self.stub = weight_store_pb2_grpc.WeightStoreStub(self.channel)

    def manifest(self) -> tuple[Manifest, str]:
        resp = self._call(self.stub.GetManifest, weight_store_pb2.GetManifestRequest())
        return Manifest.from_json(resp.manifest_json, where=f"manifest from {self.address}"), resp.tokenizer_json

    def locate(self, shards: list[str] | None = None) -> weight_store_pb2.LocateShardsResponse:
        """Where each shard is: in the host tier, or on disk (then `staging` says where
        StageShard reads it to)."""
        return self._call(self.stub.LocateShards, weight_store_pb2.LocateShardsRequest(shards=shards or []))

    def stage_async(self, request: weight_store_pb2.StageShardRequest):
        """Read a disk-tier shard into a staging slot (an RPC future; see `result`)."""
        return self._future(self.stub.StageShard, request)

    def read_shard(self, shard: str) -> bytes:
        return self._call(self.stub.ReadShard, weight_store_pb2.ReadShardRequest(shard=shard)).data


class KVStoreClient(_Peer):
    name = "KV store"

    def __init__(self, address: str, timeout_s: float):
        super().__init__(address, timeout_s)
        self.stub = kv_store_pb2_grpc.KVStoreStub(self.channel)

    def register_region(self, name: str, byte_size: int) -> None:
        self._call(self.stub.RegisterRegion, common_pb2.RegisterRegionRequest(name=name, byte_size=byte_size))

    def unregister_region(self, name: str) -> None:
        self._call(self.stub.UnregisterRegion, common_pb2.UnregisterRegionRequest(name=name))

    def allocate(self, request: kv_store_pb2.AllocateRequest) -> kv_store_pb2.AllocateResponse:
        return self._call(self.stub.Allocate, request)

    def append(self, request: kv_store_pb2.AppendRequest) -> kv_store_pb2.AppendResponse:
        return self._call(self.stub.Append, request)

    def attend_async(self, request: kv_store_pb2.AttendRequest):
        return self._future(self.stub.Attend, request)

    def free(self, group: str) -> None:
        self._call(self.stub.Free, kv_store_pb2.FreeRequest(group=group))
