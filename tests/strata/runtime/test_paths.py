"""strata/runtime/paths.py: one cache root, $STRATA_CACHE (default $XDG_CACHE_HOME/strata, else
~/.cache/strata), a folder per kind, and the kernel builders and the hardware profile
write under it."""

import pytest

from strata.runtime import paths


def test_the_root_is_strata_cache_else_xdg_cache_home_else_home_cache_strata(monkeypatch, tmp_path):
    monkeypatch.delenv("STRATA_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.cache_root() == tmp_path / "home" / ".cache" / "strata"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.cache_root() == tmp_path / "xdg" / "strata"
    monkeypatch.setenv("STRATA_CACHE", str(tmp_path / "c"))
    assert paths.cache_root() == tmp_path / "c"
    monkeypatch.setenv("STRATA_CACHE", "")  # empty: as if unset
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert paths.cache_root() == tmp_path / "home" / ".cache" / "strata"


def test_the_hardware_profile_is_at_the_root(monkeypatch, tmp_path):
    import socket

    from strata.policy import hardware

    monkeypatch.setenv("STRATA_CACHE", str(tmp_path))
    assert hardware.default_path() == tmp_path / f"profile-{socket.gethostname()}.json"
    assert hardware.default_path(tmp_path / "elsewhere").parent == tmp_path / "elsewhere"


def test_each_kind_has_its_folder_under_the_root_and_others_are_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("STRATA_CACHE", str(tmp_path))
    assert [paths.cache_dir(k) for k in paths.KINDS] == [tmp_path / k for k in paths.KINDS]
    assert not any(p.exists() for p in tmp_path.iterdir())  # nothing made by asking
    with pytest.raises(ValueError, match="cache kind"):
        paths.cache_dir("../elsewhere")


def test_the_kv_store_kernel_is_built_under_the_root(monkeypatch, tmp_path):
    from kv_store import native

    monkeypatch.setenv("STRATA_CACHE", str(tmp_path))
    asked = []

    def no_compiler(out, command, timeout):
        asked.append(out)
        raise OSError("no compiler in this test")

    monkeypatch.setattr(native, "compile_once", no_compiler)
    assert native.build() is None  # falls back to SDPA
    assert [p.parent for p in asked] == [tmp_path / "native"]


def test_the_cuda_kernels_are_built_under_the_root(monkeypatch, tmp_path):
    from compute_node.kernels import cuda_build

    monkeypatch.setenv("STRATA_CACHE", str(tmp_path))
    path = cuda_build.library_path("w4a16_mma", "90", "/usr/bin/true")
    assert path.parent == tmp_path / "kernels" and path.name.startswith("w4a16_mma-sm90-")
