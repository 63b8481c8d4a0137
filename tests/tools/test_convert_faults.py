"""convert with a damaged checkpoint, without a tokenizer, and after a killed run."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from serving import strata
from strata.runtime.errors import ErrorKind, StrataError
from tools.convert import TOKENIZER_FILES, convert


def copy_of(hf, dst, tokenizer: bool = True):
    shutil.copytree(hf, dst, ignore=None if tokenizer else shutil.ignore_patterns(*TOKENIZER_FILES))
    return dst


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_safetensors_file_is_data_loss_naming_it(tiny_opt, tmp_path, damage):
    src = copy_of(tiny_opt, tmp_path / "hf")
    weights = src / "model.safetensors"
    if damage == "truncated":
        os.truncate(weights, weights.stat().st_size // 2)
    else:
        weights.write_bytes(b"" if damage == "empty" else os.urandom(4096))
    with pytest.raises(StrataError) as info:
        convert(src, tmp_path / "out", bits=16)
    assert info.value.kind is ErrorKind.DATA_LOSS
    assert str(weights) in str(info.value) and "corrupt" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_cli_convert_of_a_corrupt_checkpoint_exits_1_naming_the_file(tiny_opt, tmp_path):
    src = copy_of(tiny_opt, tmp_path / "hf")
    os.truncate(src / "model.safetensors", 1000)
    out = strata("convert", str(src), str(tmp_path / "out"), "--quant-bits", "16", timeout=120)
    assert out.returncode == 1
    assert str(src / "model.safetensors") in out.stderr and "corrupt" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_convert_without_a_tokenizer_warns(tiny_opt, tmp_path):
    src = copy_of(tiny_opt, tmp_path / "hf", tokenizer=False)
    out = strata("convert", str(src), str(tmp_path / "out"), "--quant-bits", "16", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "warning" in out.stderr and "no tokenizer.json" in out.stderr and "--ids" in out.stderr
    out = strata("convert", str(tiny_opt), str(tmp_path / "out2"), "--quant-bits", "16", timeout=120)
    assert out.returncode == 0 and "warning" not in out.stderr


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_killed_conversions_temporary_directory_is_removed_by_the_next(tiny_opt, tmp_path):
    stale = tmp_path / f".old.tmp-{dead_pid()}"  # what kill -9 during convert leaves
    stale.mkdir()
    (stale / "layer_0000.bin").write_bytes(b"\0" * 4096)
    running = tmp_path / f".other.tmp-{os.getppid()}"  # a conversion whose process lives
    running.mkdir()
    foreign = tmp_path / f".notes.tmp-{dead_pid()}"  # named alike, but not what convert writes
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")

    convert(tiny_opt, tmp_path / "out", bits=16)
    assert not stale.exists()
    assert running.exists() and foreign.exists()
