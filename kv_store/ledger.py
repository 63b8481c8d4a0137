"""Capacity accounting for the KV store: how many bytes each group holds.

Policy only (no torch, no grpc): the server asks `reserve` before it allocates a
group's tensors and `free` when the group goes away. Exhaustion is an error the caller
can act on, never a crash.
"""

from __future__ import annotations

import threading

from strata.runtime.errors import ErrorKind, StrataError


def cache_bytes(num_layers: int, batch: int, num_heads: int, max_tokens: int, head_dim: int, itemsize: int) -> int:
    """Bytes of K and V for one group: 2 * layers * batch * heads * tokens * head_dim * itemsize."""
    return 2 * num_layers * batch * num_heads * max_tokens * head_dim * itemsize


class CapacityLedger:
    """Bytes reserved per group against a fixed capacity. Thread-safe."""

    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"capacity must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def bytes_reserved(self) -> int:
        with self._lock:
            return sum(self._held.values())

    @property
    def bytes_free(self) -> int:
        with self._lock:
            return self.capacity_bytes - sum(self._held.values())

    def groups(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def held(self, group: str) -> int:
        """Bytes reserved by `group`; NOT_FOUND if it holds none."""
        with self._lock:
            if group not in self._held:
                raise StrataError(ErrorKind.NOT_FOUND, f"group {group!r} is not allocated")
            return self._held[group]

    def reserve(self, group: str, nbytes: int) -> int:
        """Reserve `nbytes` for a new group; returns the bytes left free."""
        if nbytes < 0:
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"cannot reserve {nbytes} bytes")
        with self._lock:
            if group in self._held:
                raise StrataError(ErrorKind.FAILED_PRECONDITION, f"group {group!r} is already allocated")
            free = self.capacity_bytes - sum(self._held.values())
            if nbytes > free:
                raise StrataError(
                    ErrorKind.RESOURCE_EXHAUSTED,
                    f"KV cache for group {group!r} needs {nbytes} bytes, only {free} of "
                    f"{self.capacity_bytes} bytes are free",
                )
            self._held[group] = nbytes
            return free - nbytes

    def free(self, group: str) -> int:
        """Release a group's bytes; returns the bytes free afterwards."""
        with self._lock:
            if group not in self._held:
                raise StrataError(ErrorKind.NOT_FOUND, f"group {group!r} is not allocated")
            del self._held[group]
            return self.capacity_bytes - sum(self._held.values())


class ArenaAllocator:
    """Where each group's cache lives inside one preallocated arena: first fit over a
    sorted free list, coalescing on release. Offsets are aligned (2 MiB huge pages in
    arenas of 1 GiB or more, 4 KiB below)."""

    def __init__(self, size: int):
        self.size = size
        self.align = (2 << 20) if size >= (1 << 30) else 4096
        self._free: list[tuple[int, int]] = [(0, size)] if size > 0 else []
        self._used: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def alloc(self, group: str, nbytes: int) -> int:
        need = -(-max(nbytes, 1) // self.align) * self.align
        with self._lock:
            if group in self._used:
                raise StrataError(ErrorKind.FAILED_PRECONDITION, f"group {group!r} already has arena space")
            for i, (off, size) in enumerate(self._free):
                if size >= need:
                    self._free[i : i + 1] = [(off + need, size - need)] if size > need else []
                    self._used[group] = (off, need)
                    return off
        raise StrataError(
            ErrorKind.RESOURCE_EXHAUSTED,
            f"no contiguous {need} bytes left in the {self.size}-byte KV arena (fragmented or full)",
        )

    def release(self, group: str) -> None:
        with self._lock:
            off, size = self._used.pop(group)
            blocks = sorted(self._free + [(off, size)])
            merged: list[tuple[int, int]] = []
            for o, s in blocks:
                if merged and merged[-1][0] + merged[-1][1] == o:
                    merged[-1] = (merged[-1][0], merged[-1][1] + s)
                else:
                    merged.append((o, s))
            self._free = merged
