"""Fixtures shared by the weight store's tests."""

import pytest

from fake_shards import write_model


@pytest.fixture
def model(tmp_path):
    """A converted model of fake shards in a fresh directory: (directory, what write_model returns)."""
    directory = tmp_path / "model"
    return directory, write_model(directory)
