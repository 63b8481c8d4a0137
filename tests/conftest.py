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
    orphans = sorted(n for n in left if not _creator_alive(n))  # a live creator: another run on this machine
    assert not orphans, f"shared-memory regions left behind: {orphans}"


def _creator_alive(name: str) -> bool:
    """Region names end in -<creator pid>-<random> (strata/transport/shm.py region_name)."""
    import os

    try:
        os.kill(int(name.rsplit("-", 2)[1]), 0)
        return True
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
