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
