"""The compute node's device seam: streams, events, pinned host memory, graph capture,
and the flags the compute path reads where a CUDA device and the CPU differ, behind
one interface with three implementations, chosen once from the config's device string
(`device_for`) and handed to every part of the node that needs it:

- `cpu` (CpuDevice, here): CPU tensors; a stream or an event is a no-op (every op is
  done when it returns); streamed layers are dequantized straight from the host tier.
- `cuda`, `cuda:N` (compute_node/device/cuda.py): torch's own streams, events, CUDA
  graphs and cudaHostRegister.
- `mock-cuda` (compute_node/device/mock.py): CPU tensors through the CUDA paths (the
  packed weights ring, the KV offload stream, staging-slot events, captured decode
  steps), with streams and events that model CUDA's ordering and check its rules, so
  CI runs those paths' logic without a GPU.

Streams and events have torch.cuda's method names (`wait_event`, `wait_stream`,
`record`, `synchronize`, `query`), so the CUDA device hands out torch's objects as
they are and the code that uses them reads the same on every device."""

from __future__ import annotations

import contextlib

import torch

from strata.runtime.errors import ErrorKind, StrataError


def span(memory) -> tuple[int, int, str]:
    """(address, bytes, name) of a tensor or of a shared-memory region (strata/transport/shm.py)."""
    if isinstance(memory, torch.Tensor):
        return memory.data_ptr(), memory.numel() * memory.element_size(), "tensor"
    return memory.data_ptr(), memory.size, memory.name


class Device:
    """What the compute node asks of its device. The flags say which strategy the compute
    path takes; each is read where the choice is made, once (a layer's weights, a
    group's KV cache), not per op."""

    kind = "cpu"
    torch_device = torch.device("cpu")  # where tensors live
    # streamed layers: one packed copy into a ring of device slots on a copy stream,
    # dequantized on the compute stream when used (layer_weights.DeviceRing); else
    # dequantized straight from the host tier when loaded
    streams_ring = False
    packed_resident = False  # resident layers stay packed (INT4/INT8 as stored) and are dequantized when run
    fused_int4 = False  # packed INT4 layers may run the fused W4A16 kernel at decode (fp16/bf16)
    decode_graphs = False  # decode-only passes as fixed-shape steps, captured once per bucket (slot_graphs.py)
    # decode attention over the device's KV cache in one kernel, reading quantized codes in
    # place (kernels/decode_attention.py; its torch reference where Triton cannot run)
    fused_decode_attention = False
    gemv_attention = False  # one-query attention as two batched GEMVs (model.attend)
    whole_dequant = False  # a quantized KV cache is dequantized in one piece (else in chunks: kv_cache.py)
    host_threads: int | None = None  # torch's CPU threads in this process (None: torch's default)
    default_dtype = torch.float32  # the compute dtype unless the plan says one

    def __str__(self) -> str:
        return self.kind

    # streams and events
    def new_stream(self):
        return _NULL_STREAM

    def current_stream(self):
        return _NULL_STREAM

    def stream(self, stream):
        """Context: ops issued inside run on `stream`."""
        return contextlib.nullcontext()

    def new_event(self, blocking: bool = False):
        """`blocking`: a host synchronize sleeps instead of spinning."""
        return _NullEvent()

    def record_stream(self, tensor: torch.Tensor, stream) -> None:
        """`tensor`'s memory is not reused before `stream`'s work queued so far is done."""

    def synchronize(self) -> None:
        """Wait for all work queued on the device."""

    # host memory
    def pin(self, memory, required: bool = True) -> bool:
        """Page-lock host memory (a tensor or a shm region) for async copies to the device.
        Returns whether it is pinned now; a failure raises where `required`."""
        return False

    def unpin(self, memory) -> None:
        """Undo a `pin` that returned True."""

    # memory accounting
    def empty_cache(self) -> None:
        """Hand cached free device memory back (after running out of it)."""

    def max_memory_allocated(self) -> int:
        return 0

    # graphs
    def capture(self, fn):
        """A replayable recording of `fn() -> tensor`: `.replay()` runs it again and
        returns its output (on CUDA, always the same tensor). The caller keeps fn's
        inputs in fixed tensors it updates in place."""
        return _Eager(fn)


class CpuDevice(Device):
    """CPU tensors, nothing asynchronous: the defaults of `Device`."""


class _NullStream:
    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_NULL_STREAM = _NullStream()


class _NullEvent:
    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _Eager:
    """A 'captured' function that a replay simply runs again."""

    def __init__(self, fn):
        self.fn = fn

    def replay(self) -> torch.Tensor:
        return self.fn()


def device_for(spec: str | torch.device | Device) -> Device:
    """The device a config string (`cpu`, `cuda`, `cuda:N`, `mock-cuda`) or a torch
    device names; a Device is returned as it is. Each call makes a new one: a node makes
    its device once and passes it on (a mock device's streams are its own)."""
    if isinstance(spec, Device):
        return spec
    if str(spec) == "mock-cuda":
        from compute_node.device.mock import MockCudaDevice

        return MockCudaDevice()
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        device = None
    if device is not None and device.type == "cuda":
        from compute_node.device.cuda import CudaDevice

        return CudaDevice(device)
    if device is not None and device.type == "cpu":
        return CpuDevice()
    raise StrataError(ErrorKind.INVALID_ARGUMENT, f"unknown device {spec!r}: cpu, cuda, cuda:N or mock-cuda")
