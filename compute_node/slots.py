"""The scheduler's policy: which slot a sequence takes, which waiting request is admitted
next, and what is refused at once. No torch, no grpc: unit-tested alone.

The running batch is `groups` of rows (the planner's micro-batches); a row holds one
sequence of at most `capacity` tokens (prompt + generated - 1: the last token is never
fed back). A request's sequences are admitted together (one call streams them in
step), first come first served: the head of the queue waits until enough rows are free,
and nothing overtakes it (no starvation of large requests)."""

from __future__ import annotations

import collections
import dataclasses

from strata.runtime.errors import ErrorKind, StrataError


@dataclasses.dataclass(frozen=True)
class Limits:
    groups: tuple[int, ...]  # rows per group
    capacity: int  # tokens a row holds
    max_queue: int  # sequences waiting, at most

    @property
    def slots(self) -> int:
        return sum(self.groups)


def even_groups(slots: int, groups: int) -> tuple[int, ...]:
    """`slots` rows in `groups` groups of nearly equal size (none empty)."""
    m = max(1, min(groups, slots))
    bounds = [round(k * slots / m) for k in range(m + 1)]
    return tuple(b - a for a, b in zip(bounds, bounds[1:]))


def default_max_queue(slots: int) -> int:
    """Enough waiting sequences for several batches' worth of clients."""
    return max(64, 8 * slots)


class SlotPool:
    """Free rows per group. A sequence takes the lowest free row of the group with the
    fewest rows in use: groups stay balanced (their attention overlaps), and running
    rows stay low in each group (a decode step covers rows below the highest in use)."""

    def __init__(self, groups: tuple[int, ...]):
        self.sizes = groups
        self.used: list[set[int]] = [set() for _ in groups]
        self.cap = sum(groups)  # sequences that may run at once: lowered after the device ran out of memory

    @property
    def in_use(self) -> int:
        return sum(len(u) for u in self.used)

    @property
    def free(self) -> int:
        """Rows a waiting request may take now: free rows, within the cap (at most the slots)."""
        return max(0, self.cap - self.in_use)

    def take(self) -> tuple[int, int]:
        candidates = [g for g, n in enumerate(self.sizes) if len(self.used[g]) < n]
        if not candidates:
            raise StrataError(ErrorKind.RESOURCE_EXHAUSTED, "no free slot")
        g = min(candidates, key=lambda g: (len(self.used[g]), g))
        row = next(r for r in range(self.sizes[g]) if r not in self.used[g])
        self.used[g].add(row)
        return g, row

    def give(self, slot: tuple[int, int]) -> None:
        g, row = slot
        if row not in self.used[g]:
            raise ValueError(f"slot {slot} is not in use")
        self.used[g].discard(row)

    def rows_in_use(self, g: int) -> int:
        """Rows a decode step of group g covers: up to its highest row in use."""
        return max(self.used[g]) + 1 if self.used[g] else 0


def check_fits(limits: Limits, lengths: list[tuple[int, int]]) -> None:
    """Refuse at once a request that could never run: (prompt, max_new_tokens) per
    sequence. Raises StrataError(RESOURCE_EXHAUSTED)."""
    if len(lengths) > limits.slots:
        raise StrataError(ErrorKind.RESOURCE_EXHAUSTED,
                          f"{len(lengths)} prompts exceed the {limits.slots} sequences the batch holds")
    for i, (prompt, new) in enumerate(lengths):
        if prompt + new - 1 > limits.capacity:
            raise StrataError(ErrorKind.RESOURCE_EXHAUSTED,
                              f"prompt {i}: {prompt} tokens + max_new_tokens {new} exceed the {limits.capacity + 1} "
                              "tokens a sequence slot holds (serve --max-seq-len)")


class WaitQueue:
    """Requests waiting for slots, in arrival order, bounded in sequences."""

    def __init__(self, max_sequences: int):
        self.max = max_sequences
        self.items: collections.deque = collections.deque()
        self.sequences = 0

    def push(self, request, n: int) -> None:
        if self.sequences + n > self.max:
            raise StrataError(ErrorKind.RESOURCE_EXHAUSTED,
                              f"the wait queue is full ({self.sequences} sequences waiting, at most {self.max}); "
                              "retry later")
        self.items.append((request, n))
        self.sequences += n

    def push_front(self, request, n: int) -> None:
        """A request taken back from the running batch: first in line, past the bound (it
        was admitted once; refusing it now would lose it)."""
        self.items.appendleft((request, n))
        self.sequences += n

    def admissible(self, free: int):
        """The requests to admit now: from the head while each fits the free rows."""
        out = []
        while self.items and self.items[0][1] <= free:
            request, n = self.items.popleft()
            self.sequences -= n
            free -= n
            out.append(request)
        return out

    def remove(self, keep) -> list:
        """Drops the requests for which keep(request) is false; returns them."""
        dropped = [(r, n) for r, n in self.items if not keep(r)]
        if dropped:
            self.items = collections.deque((r, n) for r, n in self.items if keep(r))
            self.sequences -= sum(n for _, n in dropped)
        return [r for r, _ in dropped]

    def __len__(self) -> int:
        return len(self.items)
