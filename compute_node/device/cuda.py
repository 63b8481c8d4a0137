"""A CUDA device: torch's own streams, events and CUDA graphs, host memory pinned with
cudaHostRegister. Each method is the one torch call the compute path made before
there was a seam, so the GPU runs the same work in the same order."""

from __future__ import annotations

import torch

from compute_node.device import Device, span
from strata.runtime.errors import ErrorKind, StrataError


class CudaDevice(Device):
    kind = "cuda"
    streams_ring = True
    packed_resident = True
    fused_int4 = True
    decode_graphs = True
    fused_decode_attention = True
    gemv_attention = True  # cuDNN's attention rebuilds its graph for every new key length
    whole_dequant = True
    host_threads = 2  # the host side only stages copies; leave the cores to the KV store
    # bf16 on the GPU: as fast as fp16 there, and the KV store's CPU attention reads bf16 at
    # DRAM speed (AMX) but fp16 at half of it (BENCHMARKS.md, "Kernel measurements")
    default_dtype = torch.bfloat16

    def __init__(self, device: torch.device):
        if not torch.cuda.is_available():
            raise StrataError(ErrorKind.FAILED_PRECONDITION, "--device cuda asked for, but no CUDA device is present")
        self.torch_device = device

    def __str__(self) -> str:
        return str(self.torch_device)

    def new_stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.torch_device)

    def current_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.torch_device)

    def stream(self, stream: torch.cuda.Stream):
        return torch.cuda.stream(stream)

    def new_event(self, blocking: bool = False) -> torch.cuda.Event:
        return torch.cuda.Event(blocking=blocking)

    def record_stream(self, tensor: torch.Tensor, stream: torch.cuda.Stream) -> None:
        tensor.record_stream(stream)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.torch_device)

    def pin(self, memory, required: bool = True) -> bool:
        ptr, size, name = span(memory)
        err = torch.cuda.cudart().cudaHostRegister(ptr, size, 0)
        if int(err) == 0:
            return True
        if required:
            raise StrataError(ErrorKind.INTERNAL, f"cudaHostRegister of {name} failed ({err})")
        return False

    def unpin(self, memory) -> None:
        torch.cuda.cudart().cudaHostUnregister(span(memory)[0])

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def max_memory_allocated(self) -> int:
        return torch.cuda.max_memory_allocated(self.torch_device)

    def capture(self, fn) -> "CudaGraph":
        """Record fn's kernels (the caller has run fn once already, on a side stream:
        capture needs them warmed up). An op that cannot be captured raises."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = fn()
        return CudaGraph(graph, out)


class CudaGraph:
    """A captured graph and the tensor its replays write their output to."""

    def __init__(self, graph: torch.cuda.CUDAGraph, out: torch.Tensor):
        self.graph, self.out = graph, out

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.out
