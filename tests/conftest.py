import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory) -> pathlib.Path:
    return tiny_models.make_opt(tmp_path_factory.mktemp("hf") / "tiny-opt")


@pytest.fixture(scope="session")
def tiny_bloom(tmp_path_factory) -> pathlib.Path:
    return tiny_models.make_bloom(tmp_path_factory.mktemp("hf") / "tiny-bloom")


@pytest.fixture(scope="session", autouse=True)
def no_shared_memory_left_behind():
    """After the whole suite, no strata-* region of ours is left in /dev/shm (regions
    are removed by their owner, or swept by `strata serve` when an owner is killed)."""
    shm = pathlib.Path("/dev/shm")
    before = {p.name for p in shm.glob("strata-*")}
    yield
    left = {p.name for p in shm.glob("strata-*")} - before
    assert not left, f"shared-memory regions left behind: {sorted(left)}"
