"""Named shared-memory regions: the data plane between services on one host.

A region is a file in /dev/shm created 0600 by its owner, mapped by peers by name.
Names carry a session prefix (`strata-<session>-`) so that whoever supervises the
services (deploy/) can remove every region of a session when an owner dies, including
by SIGKILL, where the owner's own cleanup cannot run. Python's
multiprocessing.shared_memory is not used: its resource tracker unlinks regions that
other processes still use and warns on exit.
"""

from __future__ import annotations

import mmap
import os
import pathlib
import secrets
import threading

import torch

from strata.runtime.errors import ErrorKind, StrataError

SHM_DIR = pathlib.Path("/dev/shm")
PREFIX = "strata-"

_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int32": torch.int32,
    "int64": torch.int64,
}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise StrataError(ErrorKind.INVALID_ARGUMENT, f"unknown dtype {name!r}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def new_session_id() -> str:
    return secrets.token_hex(4)


def region_name(session: str, purpose: str) -> str:
    return f"{PREFIX}{session}-{purpose}-{os.getpid()}-{secrets.token_hex(2)}"


class Region:
    """One mapped region. `owner` regions unlink their file on close."""

    def __init__(self, name: str, size: int, mm: mmap.mmap, owner: bool):
        self.name = name
        self.size = size
        self._mm = mm
        self.owner = owner
        # Through a memoryview: every tensor viewing the region then holds an export of
        # the mapping, so close() cannot unmap it under them (torch.frombuffer on the
        # mmap itself holds none, and a view used after close() would read unmapped memory).
        self._base = torch.frombuffer(memoryview(mm), dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)

    @classmethod
    def create(cls, name: str, size: int) -> "Region":
        if "/" in name or not name.startswith(PREFIX):
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"bad region name {name!r}")
        path = SHM_DIR / name
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, max(size, 1))
            mm = mmap.mmap(fd, max(size, 1), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return cls(name, size, mm, owner=True)

    @classmethod
    def attach(cls, name: str, expected_size: int | None = None) -> "Region":
        if "/" in name or not name.startswith(PREFIX):
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"bad region name {name!r}")
        try:
            fd = os.open(SHM_DIR / name, os.O_RDWR)
        except FileNotFoundError:
            raise StrataError(ErrorKind.NOT_FOUND, f"shared-memory region {name!r} does not exist") from None
        try:
            size = os.fstat(fd).st_size
            if expected_size is not None and size < expected_size:
                raise StrataError(
                    ErrorKind.INVALID_ARGUMENT, f"region {name!r} has {size} bytes, expected {expected_size}"
                )
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return cls(name, size, mm, owner=False)

    def bytes_view(self, offset: int, byte_size: int) -> torch.Tensor:
        if offset < 0 or byte_size < 0 or offset + byte_size > self.size:
            raise StrataError(
                ErrorKind.INVALID_ARGUMENT,
                f"range [{offset}, {offset + byte_size}) outside region {self.name!r} of {self.size} bytes",
            )
        return self._base[offset : offset + byte_size]

    def tensor(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if offset % itemsize:
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"offset {offset} is not aligned to {dtype} in {self.name!r}")
        n = 1
        for s in shape:
            n *= int(s)
        return self.bytes_view(offset, n * itemsize).view(dtype).view(tuple(shape))

    def data_ptr(self) -> int:
        return self._base.data_ptr()

    def close(self) -> None:
        self._base = None  # type: ignore[assignment]
        try:
            self._mm.close()
        except BufferError:
            pass  # tensors still view it; it is unmapped once they and this object are gone
        if self.owner:
            (SHM_DIR / self.name).unlink(missing_ok=True)


def sweep(session: str) -> list[str]:
    """Remove every region of a session (after its processes are gone)."""
    removed = []
    for p in SHM_DIR.glob(f"{PREFIX}{session}-*"):
        p.unlink(missing_ok=True)
        removed.append(p.name)
    return removed


class RegionTable:
    """Regions a service has attached, by name, refcounted (Triton's register /
    unregister). Unregistering waits for users to release."""

    def __init__(self) -> None:
        self._regions: dict[str, Region] = {}
        self._users: dict[str, int] = {}
        self._cv = threading.Condition()

    def register(self, name: str, byte_size: int = 0) -> Region:
        with self._cv:
            region = self._regions.get(name)
            if region is None:
                region = Region.attach(name, byte_size or None)
                self._regions[name] = region
                self._users[name] = 0
            return region

    def acquire(self, name: str) -> Region:
        """A registered region, held until release (register first, as Triton)."""
        with self._cv:
            if name not in self._regions:
                raise StrataError(ErrorKind.NOT_FOUND, f"region {name!r} is not registered")
            self._users[name] += 1
            return self._regions[name]

    def release(self, name: str) -> None:
        with self._cv:
            if name in self._users:
                self._users[name] -= 1
            self._cv.notify_all()

    def unregister(self, name: str, timeout: float = 30.0) -> None:
        with self._cv:
            if name not in self._regions:
                raise StrataError(ErrorKind.NOT_FOUND, f"region {name!r} is not registered")
            if not self._cv.wait_for(lambda: self._users[name] == 0, timeout):
                raise StrataError(ErrorKind.FAILED_PRECONDITION, f"region {name!r} still in use")
            self._regions.pop(name).close()
            self._users.pop(name)

    def close_all(self) -> None:
        with self._cv:
            for r in self._regions.values():
                r.close()
            self._regions.clear()
            self._users.clear()
