"""`--device mock-cuda`: CPU tensors, with streams, events and graphs that model CUDA's
ordering and check the rules the CUDA paths rely on, so CI runs those paths (the
packed weights ring, the KV offload stream, staging-slot events, captured decode
steps) without a GPU.

The model. The compute stream (a thread's current stream unless `stream(s)` says
otherwise) runs every op at once. On another stream, an async copy (`dst.copy_(src,
non_blocking=True)` inside `stream(s)`) is queued, not run: it runs once something
waits for it (a stream waits for, or the host synchronizes on, an event recorded after
it; `wait_stream`; `synchronize`), or before a later op on its own stream touches its
memory. A reader that forgot to wait reads the bytes from before the copy, and its
tokens come out wrong. Other ops inside `stream(s)` run at once.

The rules checked (a MockCudaError where broken; on a GPU each is a race or a no-op):
- a stream waits for, or the host synchronizes on, an event never recorded;
- write after read: a copy into memory another stream took (it waited for the event
  that published the copy: an event publishes the copies queued on its stream since
  the stream's previous event) comes before that stream's reads are done, i.e. the
  copying stream has not waited for an event the reader recorded after taking it
  (DeviceRing's `consumed` event is that);
- overwritten before read: a stream takes bytes that a later copy has overwritten;
- streams and events of another device; pinning memory twice; unpinning memory not pinned.
A captured graph (MockGraph) checks what makes a CUDA graph's replay equal to running
its function: no host synchronization while capturing, and every replay the same ops
on the same shapes and scalars, reading the same input memory."""

from __future__ import annotations

import collections
import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from compute_node.device import Device, span

LOG_LEN = 4096  # the order log keeps this many last entries
# ops that touch no tensor's bytes (views, sizes)
_NO_BYTES = frozenset({"__getitem__", "__get__", "numel", "size", "dim", "stride", "element_size", "data_ptr",
                       "untyped_storage", "view", "reshape", "narrow", "as_strided", "is_contiguous"})
# ops that wait for the device (a CUDA graph capture fails on them)
HOST_SYNC = frozenset({"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__",
                       "nonzero", "masked_select", "unique"})


class MockCudaError(RuntimeError):
    """A CUDA ordering or capture rule broken: it may pass on the CPU and race on a GPU."""


def _memory(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class MockStream:
    def __init__(self, device: "MockCudaDevice", name: str):
        self.device, self.name = device, name
        self.pos = 0  # this stream's clock: one tick per copy, record and wait
        self.seen: dict[MockStream, int] = {}  # how far each other stream is waited for
        self.pending: list[tuple[int, int, int, object]] = []  # queued copies: (position, dst, src, run)
        self.unpublished: set[int] = set()  # memory copied into since this stream's last event

    def __repr__(self) -> str:
        return f"<mock stream {self.name}>"

    def wait_event(self, event: "MockEvent") -> None:
        self.device._wait(self, event)

    def wait_stream(self, stream: "MockStream") -> None:
        event = self.device.new_event()
        event.record(stream)
        self.wait_event(event)

    def synchronize(self) -> None:
        self.device._run(self, self.pos)

    def query(self) -> bool:
        return not self.pending


class MockEvent:
    def __init__(self, device: "MockCudaDevice"):
        self.device = device
        self.stream: MockStream | None = None  # where it was last recorded
        self.at = 0  # and at which position
        self.seen: dict[MockStream, int] = {}
        self.publishes: frozenset[int] = frozenset()

    def record(self, stream: MockStream | None = None) -> None:
        self.device._record(self, stream if stream is not None else self.device.current_stream())

    def wait(self, stream: MockStream | None = None) -> None:
        (stream if stream is not None else self.device.current_stream()).wait_event(self)

    def synchronize(self) -> None:
        self.device._sync(self)

    def query(self) -> bool:
        return self.stream is not None and all(p > self.at for p, *_ in self.stream.pending)


class MockCudaDevice(Device):
    kind = "mock-cuda"
    streams_ring = True
    packed_resident = True
    fused_int4 = True
    decode_graphs = True
    fused_decode_attention = True
    gemv_attention = True
    whole_dequant = True

    def __init__(self):
        self.torch_device = torch.device("cpu")
        self.lock = threading.RLock()  # copies run on whichever thread waits for them first
        self.compute = MockStream(self, "compute")
        self.streams = [self.compute]
        self._current = threading.local()
        self.log: collections.deque = collections.deque(maxlen=LOG_LEN)  # (what, stream, ...), in order
        self.pinned: dict[int, int] = {}  # address -> bytes
        self._readers: dict[int, dict[MockStream, int]] = {}  # memory -> stream -> the position it took it at
        self._written: dict[int, tuple[MockStream, int]] = {}  # memory -> its last copy (stream, position)

    def new_stream(self) -> MockStream:
        with self.lock:
            stream = MockStream(self, f"side{len(self.streams)}")
            self.streams.append(stream)
            return stream

    def current_stream(self) -> MockStream:
        return getattr(self._current, "stream", self.compute)

    @contextlib.contextmanager
    def stream(self, stream: MockStream):
        self._check(stream)
        previous = self.current_stream()
        self._current.stream = stream
        try:
            if stream is self.compute:
                yield
            else:
                with _Deferring(self, stream):
                    yield
        finally:
            self._current.stream = previous

    def new_event(self, blocking: bool = False) -> MockEvent:
        return MockEvent(self)

    def record_stream(self, tensor: torch.Tensor, stream: MockStream) -> None:
        self._check(stream)  # a queued copy holds its tensors: their memory is not reused

    def synchronize(self) -> None:
        with self.lock:
            for stream in self.streams:
                self._run(stream, stream.pos)

    def pin(self, memory, required: bool = True) -> bool:
        ptr, size, name = span(memory)
        with self.lock:
            if ptr in self.pinned:
                raise MockCudaError(f"{name} pinned twice (cudaHostRegister refuses registered memory)")
            self.pinned[ptr] = size
            self.log.append(("pin", name, size))
        return True

    def unpin(self, memory) -> None:
        ptr, _, name = span(memory)
        with self.lock:
            if self.pinned.pop(ptr, None) is None:
                raise MockCudaError(f"{name} unpinned but not pinned")
            self.log.append(("unpin", name))

    def empty_cache(self) -> None:
        self.log.append(("empty_cache",))

    def capture(self, fn) -> "MockGraph":
        return MockGraph(fn)

    # the model
    def _check(self, obj) -> None:
        if getattr(obj, "device", None) is not self:
            raise MockCudaError(f"{obj!r} is not of this mock device")

    def _record(self, event: MockEvent, stream: MockStream) -> None:
        self._check(event)
        self._check(stream)
        with self.lock:
            stream.pos += 1
            event.stream, event.at = stream, stream.pos
            event.seen = {**stream.seen, stream: stream.pos}
            event.publishes, stream.unpublished = frozenset(stream.unpublished), set()
            self.log.append(("record", stream.name, stream.pos))

    def _wait(self, stream: MockStream, event: MockEvent) -> None:
        self._check(stream)
        self._check(event)
        if event.stream is None:
            raise MockCudaError(f"stream {stream.name} waits for an event never recorded")
        with self.lock:
            self._run(event.stream, event.at)
            for s, p in event.seen.items():
                if s is not stream and stream.seen.get(s, 0) < p:
                    stream.seen[s] = p
            stream.pos += 1
            for memory in event.publishes:
                writer, at = self._written[memory]
                if writer is not event.stream or at > event.at:
                    raise MockCudaError(f"stream {stream.name} takes bytes stream {event.stream.name} copied before "
                                        f"its position {event.at}, overwritten since by {writer.name} at {at}")
                self._readers.setdefault(memory, {})[stream] = stream.pos
            self.log.append(("wait", stream.name, event.stream.name, event.at))

    def _sync(self, event: MockEvent) -> None:
        self._check(event)
        if event.stream is None:
            raise MockCudaError("the host synchronizes on an event never recorded")
        self._run(event.stream, event.at)

    def _run(self, stream: MockStream, upto: int) -> None:
        """Run `stream`'s queued copies up to its position `upto`."""
        with self.lock:
            while stream.pending and stream.pending[0][0] <= upto:
                pos, _, _, run = stream.pending.pop(0)
                with torch._C.DisableTorchFunction():
                    run()  # type: ignore[operator]
                self.log.append(("ran", stream.name, pos))

    def _copy(self, stream: MockStream, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Queue `dst.copy_(src)` on `stream`, after checking no reader of dst is left behind."""
        if torch.broadcast_shapes(dst.shape, src.shape) != dst.shape:  # copy_'s own error, where CUDA raises it
            raise RuntimeError(f"copy_ of {tuple(src.shape)} into {tuple(dst.shape)}")
        memory = _memory(dst)
        with self.lock:
            for reader, at in self._readers.get(memory, {}).items():
                if reader is not stream and stream.seen.get(reader, 0) < at:
                    raise MockCudaError(
                        f"stream {stream.name} copies into memory stream {reader.name} took at its position {at}, "
                        f"without waiting for an event {reader.name} recorded after its reads: it may overwrite "
                        "bytes still being read")
            self._readers.pop(memory, None)
            stream.pos += 1
            stream.pending.append((stream.pos, memory, _memory(src), lambda: dst.copy_(src)))
            self._written[memory] = (stream, stream.pos)
            stream.unpublished.add(memory)
            self.log.append(("copy", stream.name, stream.pos))

    def _touch(self, stream: MockStream, name: str, tensors: list[torch.Tensor], written: torch.Tensor | None) -> None:
        """An op on `stream` that reads what a queued copy writes, or writes what it reads
        or writes, runs after it (views and sizes touch no bytes)."""
        if not stream.pending or (name in _NO_BYTES and (name != "__getitem__" or len(tensors) == 1)):
            return  # (indexing by a tensor reads it)
        read = {_memory(t) for t in tensors}
        wrote = _memory(written) if written is not None else None
        if any(dst in read or wrote in (dst, src) for _, dst, src, _ in stream.pending):
            self._run(stream, stream.pos)


class _Deferring(TorchFunctionMode):
    """Inside `stream(s)` for a side stream: async copies are queued on it."""

    def __init__(self, device: MockCudaDevice, stream: MockStream):
        super().__init__()
        self.device, self.stream = device, stream

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.device.current_stream() is self.stream:
            if getattr(func, "__name__", "") == "copy_" and (kwargs.get("non_blocking") or args[2:3] == (True,)):
                self.device._copy(self.stream, args[0], args[1])
                return args[0]
            name = getattr(func, "__name__", "")
            tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
            in_place = name.endswith("_") and not name.endswith("__") and args and isinstance(args[0], torch.Tensor)
            out = kwargs.get("out")
            written = args[0] if in_place else out if isinstance(out, torch.Tensor) else None
            self.device._touch(self.stream, name, tensors, written)
        return func(*args, **kwargs)


class MockGraph:
    """A 'captured' function: capturing runs it once (no host synchronization allowed)
    and keeps its output tensor; a replay runs it again, checks it ran the captured ops
    (names, shapes, scalars, the memory of its inputs) and copies its result into that
    tensor, which it returns, as a CUDA graph's replay writes its captured output."""

    def __init__(self, fn):
        self.fn = fn
        with _Trace(capturing=True) as trace:
            self.out = fn()
        self.ops = trace.ops
        self.replays = 0

    def replay(self) -> torch.Tensor:
        with _Trace(capturing=False) as trace:
            out = self.fn()
        if trace.ops != self.ops or out.shape != self.out.shape:
            raise MockCudaError(f"replay {self.replays + 1} is not its capture: {_difference(self.ops, trace.ops)}")
        self.out.copy_(out)
        self.replays += 1
        return self.out


class _Trace(TorchFunctionMode):
    """The ops a function runs: (name, its arguments) with a tensor as (shape, dtype, and
    for one the function did not make, its memory) and anything else as its repr."""

    def __init__(self, capturing: bool):
        super().__init__()
        self.capturing = capturing
        self.ops: list[tuple] = []
        self._made: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", repr(func))
        if self.capturing and name in HOST_SYNC:
            raise MockCudaError(f"{name} while capturing: a host synchronization (CUDA graph capture fails on it)")
        self.ops.append((name, tuple(self._arg(x) for x in pytree.tree_leaves((args, kwargs)))))
        out = func(*args, **kwargs)
        self._made.update(_memory(t) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        return out

    def _arg(self, x) -> tuple | str:
        if isinstance(x, torch.Tensor):
            memory = _memory(x)
            return tuple(x.shape), x.dtype, None if memory in self._made else memory
        return repr(x)


def _difference(captured: list[tuple], replayed: list[tuple]) -> str:
    for i, (a, b) in enumerate(zip(captured, replayed)):
        if a != b:
            return f"op {i}: captured {a}, replayed {b}"
    return f"{len(captured)} ops captured, {len(replayed)} replayed"
