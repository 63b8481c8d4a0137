"""Shard readers: fill a host buffer with a byte range of a shard file.

Two implementations behind one Protocol: `PreadReader`, a thread pool of `os.preadv`
calls in chunks (O_DIRECT where buffer, offset and length are 4 KiB aligned and the
filesystem accepts it, buffered otherwise), and `KvikioReader`, used only where
`kvikio` imports and a CUDA driver is present. `make_reader` picks one.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import logging
import os
import stat
from typing import Protocol, Union

import numpy as np
import torch

from strata.runtime.errors import ErrorKind, StrataError

log = logging.getLogger(__name__)

ALIGN = 4096
CHUNK_BYTES = 8 << 20

Buffer = Union[memoryview, bytearray, torch.Tensor, np.ndarray]


class ShardReader(Protocol):
    """Reads `length` bytes at `offset_in_file` of `path` into `dest` (writable, at
    least `length` bytes). A file that ends early, is missing or fails to read raises a
    StrataError naming the file and the offset (see `truncated`, `io_error`)."""

    name: str

    def read_into(self, path: str, dest: Buffer, offset_in_file: int, length: int) -> None: ...

    def close(self) -> None: ...


def as_bytes_array(dest: Buffer, length: int) -> np.ndarray:
    """`dest` as a writable uint8 numpy array of exactly `length` bytes (no copy)."""
    if isinstance(dest, torch.Tensor):
        if not dest.is_contiguous() or dest.device.type != "cpu":
            raise StrataError(ErrorKind.INVALID_ARGUMENT, "destination must be a contiguous CPU tensor")
        arr = dest.view(torch.uint8).reshape(-1).numpy()
    else:
        arr = np.frombuffer(dest, dtype=np.uint8)
    if arr.size < length:
        raise StrataError(ErrorKind.INVALID_ARGUMENT, f"destination has {arr.size} bytes, need {length}")
    if not arr.flags.writeable:
        raise StrataError(ErrorKind.INVALID_ARGUMENT, "destination buffer is read-only")
    return arr[:length]


def truncated(path: str, ended_at: int, offset: int, length: int) -> StrataError:
    """A shard file that ends at `ended_at`, before the range asked for."""
    return StrataError(
        ErrorKind.DATA_LOSS,
        f"shard file {path} ends at byte {ended_at}: reading {length} bytes at offset {offset} needs "
        f"{offset + length} bytes (truncated file?)",
    )


# How an OS error on a shard file becomes a kind. The caller asked for bytes the
# manifest promises; a file that cannot give them (EIO, EISDIR, ENXIO, a missing file,
# ...) has lost them for this store until an operator repairs the model directory:
# DATA_LOSS, gRPC's "unrecoverable data loss or corruption", which clients do not
# retry. Not INTERNAL: a failing disk is not a broken invariant of our code. Access
# rights are the operator's to grant: PERMISSION_DENIED. Out of descriptors or kernel
# memory passes: RESOURCE_EXHAUSTED.
_PERMISSION = frozenset({errno.EACCES, errno.EPERM})
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


def io_error(path: str, offset: int, length: int, e: Exception, doing: str = "read") -> StrataError:
    """`e` (an OSError, or a library's I/O exception) on shard file `path` while doing
    `doing` for `length` bytes at `offset`, as a StrataError naming file, offset and errno."""
    code = getattr(e, "errno", None)
    where = f"shard file {path} at offset {offset} ({length} bytes)"
    if code == errno.ENOENT:
        return StrataError(
            ErrorKind.DATA_LOSS, f"shard file {path} is missing (needed {length} bytes at offset {offset})"
        )
    kind = (ErrorKind.PERMISSION_DENIED if code in _PERMISSION
            else ErrorKind.RESOURCE_EXHAUSTED if code in _EXHAUSTED else ErrorKind.DATA_LOSS)
    reason = f"{errno.errorcode.get(code, code)}: {e.strerror}" if isinstance(e, OSError) and code else str(e)
    return StrataError(kind, f"cannot {doing} {where}: {reason}")


def open_shard(path: str, offset: int = 0, length: int = 0) -> int:
    """A read descriptor; a missing or unreadable shard file is a StrataError naming
    the range (`offset`, `length`) it was opened for."""
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as e:
        raise io_error(path, offset, length, e, "open") from e


def _check_size(path: str, fd: int, offset: int, length: int) -> None:
    """A regular file shorter than offset + length is truncated. Other kinds of file (a
    directory, a device) have no meaningful size: their reads fail or end early, and
    that is reported where it happens."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise io_error(path, offset, length, e, "stat") from e
    if stat.S_ISREG(st.st_mode) and st.st_size < offset + length:
        raise truncated(path, st.st_size, offset, length)


class PreadReader:
    """A pool of `threads` workers, each reading `chunk_bytes` pieces with preadv."""

    def __init__(self, threads: int = 8, chunk_bytes: int = CHUNK_BYTES, direct: bool = True):
        if chunk_bytes % ALIGN:
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"chunk_bytes must be a multiple of {ALIGN}")
        self.name = f"pread x{threads}"
        self._chunk = chunk_bytes
        self._direct = direct and hasattr(os, "O_DIRECT")
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, threads), thread_name_prefix="shard-read")

    def read_into(self, path: str, dest: Buffer, offset_in_file: int, length: int) -> None:
        arr = as_bytes_array(dest, length)
        fd = open_shard(path, offset_in_file, length)
        direct_fd = -1
        try:
            _check_size(path, fd, offset_in_file, length)
            if self._direct and _aligned(arr.ctypes.data, offset_in_file, length):
                direct_fd = _open_direct(path)
            futures = [
                self._pool.submit(self._read_chunk, path, fd, direct_fd, arr, start, offset_in_file, length)
                for start in range(0, length, self._chunk)
            ]
            _wait_all(futures)
        finally:
            os.close(fd)
            if direct_fd >= 0:
                os.close(direct_fd)

    def _read_chunk(self, path: str, fd: int, direct_fd: int, arr: np.ndarray,
                    start: int, base: int, length: int) -> None:
        """Fill arr[start:start+chunk] from file offset base+start (O_DIRECT if possible)."""
        end = min(start + self._chunk, length)
        pos = start
        while pos < end:
            try:
                n = _pread(fd, direct_fd, arr[pos:end], base + pos)
            except OSError as e:
                raise io_error(path, base + pos, end - pos, e) from e
            if n == 0:
                raise truncated(path, base + pos, base, length)
            pos += n

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _aligned(*values: int) -> bool:
    return all(v % ALIGN == 0 for v in values)


def _pread(fd: int, direct_fd: int, view: np.ndarray, offset: int) -> int:
    """One preadv into `view`: through `direct_fd` where the range is aligned and the
    filesystem takes it (EINVAL: it does not), else through the buffered `fd`."""
    if direct_fd >= 0 and _aligned(offset, view.nbytes, view.ctypes.data):
        try:
            return os.preadv(direct_fd, [view], offset)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return os.preadv(fd, [view], offset)


def _open_direct(path: str) -> int:
    """An O_DIRECT descriptor, or -1 where the filesystem refuses (tmpfs, some overlays)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return -1


def _wait_all(futures: list[concurrent.futures.Future]) -> None:
    """Wait for every chunk (none may still write after we return), then raise the
    error of the earliest failing chunk."""
    concurrent.futures.wait(futures)
    for f in futures:
        if f.exception() is not None:
            raise f.exception()  # type: ignore[misc]


class KvikioReader:
    """kvikio's CuFile (GPUDirect Storage, or its own POSIX thread pool) into host memory."""

    def __init__(self, kvikio_module, threads: int):
        self._kvikio = kvikio_module
        self.name = f"kvikio (compat mode: {kvikio_module.defaults.compat_mode()})"
        try:
            kvikio_module.defaults.set("num_threads", threads)
        except Exception:  # noqa: BLE001 - older kvikio: keep its default
            pass

    def read_into(self, path: str, dest: Buffer, offset_in_file: int, length: int) -> None:
        arr = as_bytes_array(dest, length)
        fd = open_shard(path, offset_in_file, length)
        try:
            _check_size(path, fd, offset_in_file, length)
        finally:
            os.close(fd)
        try:
            with self._kvikio.CuFile(path, "r") as f:
                n = f.pread(arr, length, file_offset=offset_in_file).get()
        except (OSError, RuntimeError) as e:  # kvikio reports a failed read as RuntimeError
            raise io_error(path, offset_in_file, length, e) from e
        if n != length:
            raise truncated(path, offset_in_file + n, offset_in_file, length)

    def close(self) -> None:
        pass


def _cuda_driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def make_reader(threads: int = 8, prefer: str = "auto") -> ShardReader:
    """kvikio where it imports and a CUDA driver is present (unless prefer="pread"),
    else the pread pool. Logs the choice."""
    reader: ShardReader | None = None
    if prefer != "pread" and _cuda_driver_present():
        try:
            import kvikio  # type: ignore[import-not-found]

            reader = KvikioReader(kvikio, threads)
        except Exception as e:  # noqa: BLE001 - missing or broken kvikio: fall back
            log.debug("kvikio unavailable: %s", e)
    if reader is None:
        reader = PreadReader(threads)
    log.info("shard reader: %s", reader.name)
    return reader
