"""The compute node's devices (compute_node/device/): chosen from the config's string,
the CPU's no-op streams and events, and mock-cuda's model of CUDA's ordering (a copy on
a side stream lands only once waited for) and the rules it checks: waits for events
never recorded, a copy into memory another stream still reads, bytes overwritten
before they were read, objects of another device, pinning, and captured graphs that
replay something other than their capture."""

import threading

import pytest
import torch

from compute_node.device import CpuDevice, device_for
from compute_node.device.mock import MockCudaDevice, MockCudaError, MockGraph
from strata.runtime.errors import ErrorKind, StrataError


def copy_on(dev, stream, dst, src):
    """dst <- src on `stream`, as the CUDA paths write it; the event after it."""
    with dev.stream(stream):
        dst.copy_(src, non_blocking=True)
        event = dev.new_event()
        event.record(stream)
    return event


def test_devices_are_chosen_by_name():
    assert isinstance(device_for("cpu"), CpuDevice) and isinstance(device_for(torch.device("cpu")), CpuDevice)
    mock = device_for("mock-cuda")
    assert isinstance(mock, MockCudaDevice) and device_for(mock) is mock
    assert mock.torch_device == torch.device("cpu") and mock.streams_ring and mock.decode_graphs
    with pytest.raises(StrataError) as e:
        device_for("tpu-ish")
    assert e.value.kind is ErrorKind.INVALID_ARGUMENT


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_cuda_without_a_gpu_is_a_failed_precondition():
    with pytest.raises(StrataError) as e:
        device_for("cuda")
    assert e.value.kind is ErrorKind.FAILED_PRECONDITION


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")
def test_the_cuda_device_hands_out_torchs_own_streams_events_and_graphs():
    dev = device_for("cuda")
    assert isinstance(dev.new_stream(), torch.cuda.Stream) and dev.current_stream() == torch.cuda.current_stream()
    assert isinstance(dev.new_event(blocking=True), torch.cuda.Event)
    host = torch.zeros(1 << 20, dtype=torch.uint8)
    assert dev.pin(host) and host.is_pinned()
    side, x = dev.new_stream(), torch.ones(1 << 20, dtype=torch.uint8, device="cuda")
    side.wait_stream(dev.current_stream())
    with dev.stream(side):
        host.copy_(x, non_blocking=True)
        event = dev.new_event()
        event.record(side)
    event.synchronize()
    dev.unpin(host)
    assert host.sum().item() == 1 << 20 and not host.is_pinned()
    y = torch.arange(4.0, device="cuda")
    dev.current_stream().wait_stream(side)
    fn = lambda: y * 2  # noqa: E731
    fn()  # warmed up, as slot_graphs does on a side stream
    graph = dev.capture(fn)
    y.copy_(torch.ones(4, device="cuda"))
    assert torch.equal(graph.replay(), torch.full((4,), 2.0, device="cuda")) and graph.replay() is graph.out


def test_the_cpu_device_runs_everything_at_once_and_pins_nothing():
    dev = CpuDevice()
    dst, src = torch.zeros(4), torch.ones(4)
    event = copy_on(dev, dev.new_stream(), dst, src)
    assert torch.equal(dst, src) and event.query()
    dev.current_stream().wait_event(event)
    assert dev.pin(torch.zeros(8)) is False and dev.max_memory_allocated() == 0
    assert torch.equal(dev.capture(lambda: dst * 2).replay(), src * 2)


def test_a_side_stream_copy_lands_when_a_stream_waits_for_its_event():
    dev = MockCudaDevice()
    dst, src = torch.zeros(4), torch.ones(4)
    event = copy_on(dev, dev.new_stream(), dst, src)
    assert torch.equal(dst, torch.zeros(4)) and not event.query()  # queued: a reader that did not wait sees 0
    dev.current_stream().wait_event(event)
    assert torch.equal(dst, src) and event.query()


@pytest.mark.parametrize("how", ["event", "wait_stream", "stream", "device"])
def test_the_host_or_a_stream_waiting_in_any_way_runs_the_copy(how):
    dev = MockCudaDevice()
    side = dev.new_stream()
    dst = torch.zeros(4)
    event = copy_on(dev, side, dst, torch.ones(4))
    {"event": event.synchronize, "wait_stream": lambda: dev.current_stream().wait_stream(side),
     "stream": side.synchronize, "device": dev.synchronize}[how]()
    assert torch.equal(dst, torch.ones(4))


def test_the_host_may_wait_on_another_thread():
    """As the exchange's sender and the disk stager's release do."""
    dev = MockCudaDevice()
    dst = torch.zeros(1 << 16)
    event = copy_on(dev, dev.new_stream(), dst, torch.ones(1 << 16))
    waiter = threading.Thread(target=event.synchronize)
    waiter.start()
    waiter.join()
    assert torch.equal(dst, torch.ones(1 << 16))


def test_a_later_op_on_the_same_stream_sees_its_queued_copy():
    dev = MockCudaDevice()
    side = dev.new_stream()
    dst = torch.zeros(4)
    with dev.stream(side):
        dst.copy_(torch.ones(4), non_blocking=True)
        doubled = dst * 2
    assert torch.equal(doubled, torch.full((4,), 2.0))


def test_waiting_for_an_event_never_recorded_is_an_error():
    dev = MockCudaDevice()
    with pytest.raises(MockCudaError, match="never recorded"):
        dev.current_stream().wait_event(dev.new_event())
    with pytest.raises(MockCudaError, match="never recorded"):
        dev.new_event().synchronize()


def test_a_copy_into_memory_a_stream_took_must_wait_for_that_streams_later_event():
    """The ring's rule: slot k is refilled only after the event the compute stream
    recorded after reading it."""
    dev = MockCudaDevice()
    ring, compute = dev.new_stream(), dev.current_stream()
    slot = torch.zeros(4)
    compute.wait_event(copy_on(dev, ring, slot, torch.ones(4)))  # compute takes the slot and reads it
    stale = dev.new_event()
    stale.record(ring)
    ring.wait_event(stale)  # an event of its own is no news of the reader
    with pytest.raises(MockCudaError, match="without waiting"):
        copy_on(dev, ring, slot, torch.full((4,), 2.0))
    consumed = dev.new_event()
    consumed.record(compute)
    ring.wait_event(consumed)
    compute.wait_event(copy_on(dev, ring, slot, torch.full((4,), 2.0)))
    assert torch.equal(slot, torch.full((4,), 2.0))


def test_bytes_overwritten_before_they_were_taken_are_an_error():
    dev = MockCudaDevice()
    side = dev.new_stream()
    slot = torch.zeros(4)
    first = copy_on(dev, side, slot, torch.ones(4))
    copy_on(dev, side, slot, torch.full((4,), 2.0))
    with pytest.raises(MockCudaError, match="overwritten"):
        dev.current_stream().wait_event(first)


def test_streams_and_events_of_another_device_are_refused():
    dev, other = MockCudaDevice(), MockCudaDevice()
    with pytest.raises(MockCudaError, match="not of this mock device"):
        dev.current_stream().wait_stream(other.current_stream())
    with pytest.raises(MockCudaError, match="not of this mock device"):
        with dev.stream(other.new_stream()):
            pass


def test_memory_is_pinned_once_and_unpinned_once():
    dev = MockCudaDevice()
    t = torch.zeros(1024, dtype=torch.uint8)
    assert dev.pin(t) and dev.pinned == {t.data_ptr(): 1024}
    with pytest.raises(MockCudaError, match="pinned twice"):
        dev.pin(t)
    dev.unpin(t)
    with pytest.raises(MockCudaError, match="not pinned"):
        dev.unpin(t)


class Step:
    """A fixed-shape step: inputs in `x`, updated in place between replays."""

    def __init__(self):
        self.x = torch.arange(4.0)
        self.n = 4

    def __call__(self):
        return (self.x[: self.n] * 2).sum(0, keepdim=True)


def test_a_mock_graph_replays_into_its_captured_output():
    step = Step()
    graph = MockGraph(step)
    out = graph.out
    step.x.copy_(torch.ones(4))
    assert graph.replay() is out and out.item() == 8.0 and graph.replays == 1


@pytest.mark.parametrize("change", [
    lambda s: setattr(s, "x", torch.ones(4)),  # a new input tensor: the graph reads the old one
    lambda s: setattr(s, "n", 3),  # a Python scalar: baked into the capture
    lambda s: setattr(s, "x", torch.ones(5)),  # a shape
], ids=["new-input", "scalar", "shape"])
def test_a_replay_that_is_not_its_capture_is_an_error(change):
    step = Step()
    graph = MockGraph(step)
    change(step)
    with pytest.raises(MockCudaError, match="not its capture"):
        graph.replay()


def test_a_host_synchronization_while_capturing_is_an_error():
    x = torch.ones(3)
    with pytest.raises(MockCudaError, match="host synchronization"):
        MockGraph(lambda: x * x.sum().item())
