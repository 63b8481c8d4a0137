"""Host memory for the KV cache: anonymous mappings advised for transparent huge pages,
and how much of a mapping the kernel actually backed with them.

The decode attention streams the whole cache every step, so its page size matters: on
4 KiB pages every 4 KiB of a row is a new TLB entry and a stop for the hardware
prefetcher. Whether a madvised mapping gets 2 MiB pages depends on the host (the THP
setting, and free memory that is not fragmented: a cache of ~93% of RAM competes with
the page cache), so the KV store measures it after faulting its arena in and logs it.
"""

from __future__ import annotations

import mmap
import os

import torch

SMAPS = "/proc/self/smaps"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_page_tensor(nbytes: int) -> torch.Tensor:
    """Uninitialized uint8 bytes in anonymous memory advised for transparent huge
    pages: first-touch faults of a ~100 GB cache are 512x fewer than with 4 KiB pages."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mm.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(mm, dtype=torch.uint8, count=nbytes)


def huge_page_bytes(t: torch.Tensor, smaps: str = SMAPS) -> int | None:
    """Bytes of `t`'s memory on transparent huge pages: the AnonHugePages of every
    mapping inside [start, end) of the tensor, plus the share of any mapping that
    straddles an end (a mapping reports one total). None where smaps is unreadable."""
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    total = 0.0
    lo = hi = 0
    try:
        with open(smaps) as f:
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):  # a mapping's header: "lo-hi perms ..."
                    a, b = head.split("-")
                    lo, hi = int(a, 16), int(b, 16)
                elif head == "AnonHugePages:" and lo < end and hi > start:
                    overlap = min(hi, end) - max(lo, start)
                    total += int(line.split()[1]) * 1024 * overlap / (hi - lo)
    except (OSError, ValueError, IndexError):
        return None
    return round(total)


def thp_setting(path: str = THP_ENABLED) -> str:
    """The host's transparent-huge-page mode ("always", "madvise" or "never"; "" if unknown)."""
    try:
        text = open(path).read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""


def describe(t: torch.Tensor) -> str:
    """One log phrase on `t`'s pages: "X of Y GiB on huge pages (THP mode)"."""
    size = t.numel() * t.element_size()
    huge = huge_page_bytes(t)
    mode = thp_setting() or "unknown"
    if huge is None:
        return f"huge pages unknown ({SMAPS} unreadable; THP {mode})"
    return f"{huge / 2**30:.1f} of {size / 2**30:.1f} GiB on huge pages (THP {mode}, pid {os.getpid()})"
