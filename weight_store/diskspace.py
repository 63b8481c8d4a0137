"""Writing files on a disk that may fill: OS errors while writing as StrataErrors
naming the file (a full disk is RESOURCE_EXHAUSTED), and a free-space check made
before anything is written."""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
from typing import Callable, Iterator

from strata.runtime.errors import ErrorKind, StrataError

FreeBytes = Callable[[pathlib.Path], int]

# ENOSPC: the filesystem is full; EFBIG: over the file size limit (RLIMIT_FSIZE, the
# filesystem's largest file); EDQUOT: over the user's quota. All three: no room.
DISK_FULL = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


def write_error(path: pathlib.Path, e: OSError) -> StrataError:
    """An OS error writing `path` as a StrataError naming the file and the errno."""
    reason = f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror}" if e.errno else str(e)
    if e.errno in DISK_FULL:
        return StrataError(ErrorKind.RESOURCE_EXHAUSTED, f"disk full while writing {path}: {reason}")
    kind = {errno.EACCES: ErrorKind.PERMISSION_DENIED, errno.EPERM: ErrorKind.PERMISSION_DENIED,
            errno.EROFS: ErrorKind.FAILED_PRECONDITION}.get(e.errno, ErrorKind.INTERNAL)
    return StrataError(kind, f"cannot write {path}: {reason}")


@contextlib.contextmanager
def writing(path: pathlib.Path) -> Iterator[None]:
    """OS errors inside the block are errors writing `path` (see `write_error`)."""
    try:
        yield
    except OSError as e:
        raise write_error(path, e) from e


def disk_free_bytes(path: pathlib.Path) -> int:
    """Bytes an unprivileged user may still write on the filesystem holding `path`
    (its nearest existing ancestor, if `path` does not exist yet); unlimited where the
    filesystem reports no sizes."""
    path = pathlib.Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize if st.f_blocks else 1 << 62  # no sizes reported (some FUSE): unknown


def check_free_space(directory: pathlib.Path, needed: int, free_bytes: FreeBytes | None = None,
                     what: str = "the converted model") -> None:
    """RESOURCE_EXHAUSTED, before anything is written, when the filesystem of
    `directory` has fewer than `needed` bytes free (`free_bytes`: `disk_free_bytes`)."""
    free = (free_bytes or disk_free_bytes)(directory)
    if needed > free:
        raise StrataError(
            ErrorKind.RESOURCE_EXHAUSTED,
            f"disk full: {what} needs about {needed} bytes ({needed / 2**30:.2f} GiB), "
            f"the filesystem of {directory} has {free} bytes ({free / 2**30:.2f} GiB) free",
        )
