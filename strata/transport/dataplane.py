"""TensorRef <-> torch.Tensor: the one place tensors cross a process boundary.

On one host a TensorRef names (region, offset, byte_size) in shared memory and the
tensor is a zero-copy view. With no region, the bytes travel inline (the fallback for a
peer on another host)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from strata.runtime.errors import ErrorKind, StrataError
from strata.transport.shm import Region, RegionTable, dtype_name, torch_dtype
from strata.transport.wire import common_pb2


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def ref_for(region: Region, offset: int, tensor_or_shape, dtype: torch.dtype | None = None) -> common_pb2.TensorRef:
    """A reference to a tensor at `offset` of `region` (the tensor is not copied)."""
    if isinstance(tensor_or_shape, torch.Tensor):
        shape, dtype = tuple(tensor_or_shape.shape), tensor_or_shape.dtype
    else:
        shape = tuple(tensor_or_shape)
    assert dtype is not None
    nbytes = _numel(shape) * torch.empty(0, dtype=dtype).element_size()
    return common_pb2.TensorRef(
        region=region.name, offset=offset, byte_size=nbytes, dtype=dtype_name(dtype), shape=list(shape)
    )


def inline_ref(tensor: torch.Tensor) -> common_pb2.TensorRef:
    t = tensor.detach().contiguous().cpu()
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return common_pb2.TensorRef(
        byte_size=len(data), dtype=dtype_name(t.dtype), shape=list(t.shape), inline_data=data
    )


def _check(ref: common_pb2.TensorRef) -> tuple[torch.dtype, tuple[int, ...]]:
    dtype = torch_dtype(ref.dtype)
    shape = tuple(int(s) for s in ref.shape)
    want = _numel(shape) * torch.empty(0, dtype=dtype).element_size()
    if want != ref.byte_size:
        raise StrataError(
            ErrorKind.INVALID_ARGUMENT, f"tensor of shape {shape} {ref.dtype} needs {want} bytes, ref says {ref.byte_size}"
        )
    return dtype, shape


@contextlib.contextmanager
def resolve(ref: common_pb2.TensorRef, table: RegionTable) -> Iterator[torch.Tensor]:
    """The tensor a ref points at, valid inside the with-block. Shared-memory refs are
    views (writes land in the region); inline refs are fresh tensors."""
    dtype, shape = _check(ref)
    if not ref.region:
        if len(ref.inline_data) != ref.byte_size:
            raise StrataError(ErrorKind.INVALID_ARGUMENT, "inline tensor bytes do not match byte_size")
        buf = bytearray(ref.inline_data)
        t = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
        yield t.view(dtype).view(shape)
        return
    region = table.acquire(ref.region)
    try:
        yield region.tensor(ref.offset, dtype, shape)
    finally:
        table.release(ref.region)


class Arena:
    """A bump allocator over one owned region, reset per use (exchange buffers)."""

    ALIGN = 256

    def __init__(self, region: Region):
        self.region = region
        self._top = 0

    def reset(self) -> None:
        self._top = 0

    def alloc(self, shape, dtype: torch.dtype) -> tuple[torch.Tensor, common_pb2.TensorRef]:
        nbytes = _numel(shape) * torch.empty(0, dtype=dtype).element_size()
        off = (self._top + self.ALIGN - 1) // self.ALIGN * self.ALIGN
        if off + nbytes > self.region.size:
            raise StrataError(
                ErrorKind.RESOURCE_EXHAUSTED,
                f"exchange region {self.region.name} full ({off + nbytes} > {self.region.size} bytes)",
            )
        self._top = off + nbytes
        return self.region.tensor(off, dtype, tuple(shape)), ref_for(self.region, off, tuple(shape), dtype)
