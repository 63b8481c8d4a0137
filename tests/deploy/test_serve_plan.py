"""`strata serve` resolves one run plan before it starts anything: on a GPU with no
placement flag the planner's (what it would start; no GPU needed to plan), with any
placement flag the user's; the plan is the one every service reads."""

import dataclasses
import json
import pathlib

import pytest

from deploy.cli import build_parser, serve_options
from strata.policy import hardware
from tools.dummy.files import write_dummy_model

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROFILE = ROOT / "bench/profiles/nvidia-h100-x1.json"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "opt-125m"
    write_dummy_model("facebook/opt-125m", 4, 64, out)
    return out


def options(*argv):
    return serve_options(build_parser().parse_args(["serve", *map(str, argv)]))


def test_a_model_that_fits_the_gpu_is_planned_all_resident(model, capsys):
    o = options(model, "--device", "cuda", "--profile", PROFILE)
    assert o.plan.resident_layers == tuple(range(12)) and o.plan.micro_batches >= 1 and o.plan.disk_layers == ()
    assert "planned for" in capsys.readouterr().err


def test_a_small_gpu_streams_layers_and_a_small_host_reads_some_from_disk(model, tmp_path):
    from strata.policy import cost_model as cm
    from strata.policy.model_bytes import model_for

    dims, wbf, _ = model_for(str(model), None, 64)
    wb = wbf(4)
    # at 4 micro-batches (the least activation memory a batch of 4 can have), so that no
    # micro-batch count lets every layer fit
    from strata.policy.memory_model import GPU_MARGIN_SHARE, HOST_OS_RESERVE

    gpu, _ = cm.memory(dims, wb, cm.Workload(512, 32, 4), cm.Placement(0.0, False, 4, 4), 0.0)
    prof = hardware.load(PROFILE)  # a GPU with room for 3 more layers (its margin a share of it),
    # a host for 6 of 12 and the slots
    small = dataclasses.replace(
        prof, gpu_bytes=(sum(gpu.values()) + 3.5 * wb.layer) / (1 - GPU_MARGIN_SHARE),
        host_bytes=cm.HOST_HEADROOM + HOST_OS_RESERVE + wb.other + (3 + 6) * wb.layer)
    path = tmp_path / "small.json"
    path.write_text(json.dumps(dataclasses.asdict(small)))
    o = options(model, "--device", "cuda", "--profile", path, "--plan-batch", "4")
    assert 0 <= o.plan.gpu_weight_share < 1.0
    assert o.plan.disk_layers and o.plan.disk_layers == o.plan.streamed_layers[-len(o.plan.disk_layers):]


def test_any_placement_flag_or_the_cpu_keeps_the_flags(model):
    assert options(model, "--device", "cuda", "--gpu-weight-share", "0.25").plan.resident_layers == (0, 4, 8)
    o = options(model, "--device", "cpu")
    assert o.plan.gpu_weight_share == 1.0 and o.plan.micro_batches == 1 and o.plan.max_batch == 16
    o = options(model, "--kv-offload", "--kv-bits", "8", "--micro-batches", "2", "--max-queue", "5")
    assert (o.plan.kv_home, o.plan.kv_bits, o.plan.kv_group_size) == ("kv_store", 8, 64)
    assert o.plan.micro_batches == 2 and o.plan.max_queue == 5


def test_offloaded_weights_without_a_share_stream_every_layer_and_a_budget_leaves_the_last_on_disk(model):
    """The same rule as bench's: --disk-offload or --host-budget-gb without a share means
    share 0; the host tier then holds what fits, the rest are the plan's disk layers."""
    from strata.model.manifest import Manifest

    o = options(model, "--disk-offload")
    assert o.plan.resident_layers == () and o.plan.disk_layers == tuple(range(12))
    m = Manifest.load(model)
    fixed = sum(s.size for n, s in m.shards.items() if not n.startswith("layer."))
    layer = max(s.size for n, s in m.shards.items() if n.startswith("layer."))
    budget = (fixed + 3 * layer + 4 * layer + 4096 * 16) / 2**30  # staging slots and 4 layers
    o = options(model, "--host-budget-gb", repr(budget))
    assert o.plan.disk_layers == tuple(range(4, 12))


def test_a_host_budget_too_small_or_disk_layers_over_bytes_are_refused_before_anything_starts(model):
    from strata.runtime.errors import StrataError

    with pytest.raises(StrataError, match="host budget of .* short"):
        options(model, "--host-budget-gb", "0.00001")
    with pytest.raises(StrataError, match="keeps 12 layers on disk; that needs --transport shm"):
        options(model, "--disk-offload", "--transport", "bytes")


def test_decode_graphs_are_on_unless_switched_off_and_survive_the_plan(model):
    """`--no-decode-graphs` reaches the compute node's options, planned or pinned."""
    for extra, want in (((), True), (("--no-decode-graphs",), False)):
        assert options(model, "--device", "cuda", "--profile", PROFILE, *extra).plan.decode_graphs is want
        assert options(model, "--gpu-weight-share", "1", *extra).plan.decode_graphs is want


def test_the_plan_is_for_the_slots_the_scheduler_will_allocate(model, capsys):
    """--max-batch and --max-seq-len size the scheduler's KV at start: the plan is made for them."""
    o = options(model, "--device", "cuda", "--profile", PROFILE, "--max-batch", "8", "--max-seq-len", "1024")
    assert o.plan.max_batch == 8 and o.plan.max_seq_len == 1024
    err = capsys.readouterr().err
    assert "planned for 8 prompts" in err and "GiB with the margin" in err
