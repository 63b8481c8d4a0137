"""Shard readers: bytes read equal the file's, chunked and aligned or not; a file
shorter than asked is DATA_LOSS naming the file and where it ended."""

import mmap
import os

import numpy as np
import pytest
import torch

from strata.runtime.errors import ErrorKind, StrataError
from weight_store.reader import PreadReader, make_reader


@pytest.fixture
def blob(tmp_path):
    data = os.urandom(3 * 65536 + 1234)
    path = tmp_path / "layer_0000.bin"
    path.write_bytes(data)
    return str(path), data


@pytest.fixture
def reader():
    r = PreadReader(threads=4, chunk_bytes=16384)
    yield r
    r.close()


@pytest.mark.parametrize("offset,length", [(0, 3 * 65536 + 1234), (4096, 65536), (100, 50000), (0, 0)])
def test_read_into_bytearray_matches_file(blob, reader, offset, length):
    path, data = blob
    dest = bytearray(length)
    reader.read_into(path, dest, offset, length)
    assert bytes(dest) == data[offset : offset + length]


def test_read_into_aligned_buffer_matches_file(blob, reader):
    """A page-aligned destination, offset and length: the O_DIRECT path where allowed."""
    path, data = blob
    length = 2 * 65536
    buf = mmap.mmap(-1, length)
    reader.read_into(path, memoryview(buf), 4096, length)
    assert buf[:] == data[4096 : 4096 + length]


def test_read_into_tensor_fills_only_its_range(blob, reader):
    path, data = blob
    dest = torch.zeros(10000, dtype=torch.uint8)
    reader.read_into(path, dest[1000:6000], 8192, 5000)
    out = dest.numpy()
    assert out[:1000].sum() == 0 and out[6000:].sum() == 0
    assert out[1000:6000].tobytes() == data[8192 : 8192 + 5000]


def test_read_past_end_of_file_is_data_loss_naming_file_and_offset(blob, reader):
    path, data = blob
    with pytest.raises(StrataError) as e:
        reader.read_into(path, bytearray(65536), len(data) - 100, 65536)
    assert e.value.kind is ErrorKind.DATA_LOSS
    assert path in e.value.message and str(len(data)) in e.value.message


def test_missing_file_is_data_loss_naming_it(tmp_path, reader):
    path = str(tmp_path / "layer_0003.bin")
    with pytest.raises(StrataError) as e:
        reader.read_into(path, bytearray(10), 0, 10)
    assert e.value.kind is ErrorKind.DATA_LOSS and path in e.value.message


def test_read_into_too_small_destination_is_invalid(blob, reader):
    with pytest.raises(StrataError) as e:
        reader.read_into(blob[0], bytearray(10), 0, 100)
    assert e.value.kind is ErrorKind.INVALID_ARGUMENT


def test_read_into_read_only_destination_is_invalid(blob, reader):
    with pytest.raises(StrataError) as e:
        reader.read_into(blob[0], np.zeros(100, dtype=np.uint8).tobytes(), 0, 100)
    assert e.value.kind is ErrorKind.INVALID_ARGUMENT


def test_make_reader_falls_back_to_pread_without_kvikio(blob):
    r = make_reader(threads=2)
    try:
        assert r.name.startswith("pread") or r.name.startswith("kvikio")
        dest = bytearray(1000)
        r.read_into(blob[0], dest, 5, 1000)
        assert bytes(dest) == blob[1][5:1005]
    finally:
        r.close()
