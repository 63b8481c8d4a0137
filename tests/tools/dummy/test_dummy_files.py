"""Dummy weights as files: only the shards asked for hold their random bytes; the rest
are sparse zeros that take no disk space yet load and verify like any shard."""

import os

import torch

from tools.dummy.files import DATA_FILE, data_shards, write_dummy_model
from tools.dummy.weights import fill
from weight_store.host_tier import read_shard
from weight_store.reader import make_reader

NAME = "facebook/opt-125m"


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def test_only_the_data_shards_take_disk_space_and_every_shard_verifies(tmp_path):
    out = tmp_path / "m"
    m = write_dummy_model(NAME, 4, 64, out, data={"layer.11"})
    assert data_shards(out) == {"layer.11"} and (out / DATA_FILE).exists()
    data, sparse = m.shards["layer.11"], m.shards["layer.3"]
    assert os.path.getsize(out / sparse.file) == sparse.size and allocated(out / sparse.file) < 64 << 10
    assert allocated(out / data.file) >= data.size
    reader = make_reader(prefer="pread")
    try:
        for shard in (data, sparse, m.shards["embed"]):
            buf = torch.empty(shard.size, dtype=torch.uint8)
            read_shard(reader, out, shard, buf, verify=True)  # sha256 of every part, zeros included
            if shard is sparse:
                assert not buf.any()
    finally:
        reader.close()
    # the data shard holds the dummy fill's bytes, as a fully written directory would
    want = torch.zeros(data.size, dtype=torch.uint8)
    fill({"layer.11": want}, m, threads=1)
    got = torch.frombuffer(bytearray((out / data.file).read_bytes()), dtype=torch.uint8)  # read, not mapped
    assert torch.equal(got, want)


def test_a_directory_is_reused_for_fewer_data_shards_and_rewritten_for_more(tmp_path):
    out = tmp_path / "m"
    write_dummy_model(NAME, 4, 64, out, data={"layer.10", "layer.11"})
    stamp = (out / DATA_FILE).stat().st_mtime_ns
    write_dummy_model(NAME, 4, 64, out, data={"layer.11"})
    assert (out / DATA_FILE).stat().st_mtime_ns == stamp  # reused
    write_dummy_model(NAME, 4, 64, out, data={"layer.9", "layer.11"})
    assert data_shards(out) == {"layer.9", "layer.11"}
    write_dummy_model(NAME, 4, 64, out)  # default: every shard with its bytes
    assert data_shards(out) == set(write_dummy_model(NAME, 4, 64, out).shards)
