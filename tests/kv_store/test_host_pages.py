"""kv_store/host_pages.py: the huge-page share of a mapping, read from smaps."""

import torch

from kv_store import host_pages


def smaps_entry(lo: int, hi: int, huge_kb: int) -> str:
    return (f"{lo:x}-{hi:x} rw-p 00000000 00:00 0\nSize: {(hi - lo) // 1024} kB\n"
            f"AnonHugePages: {huge_kb} kB\nVmFlags: rd wr mr mw me ac hg\n")


def test_huge_page_bytes_sums_the_mappings_inside_and_a_share_of_those_straddling(tmp_path):
    t = torch.empty(8 << 20, dtype=torch.uint8)
    start, end = t.data_ptr(), t.data_ptr() + t.numel()
    mib = 1 << 20
    smaps = tmp_path / "smaps"
    smaps.write_text(
        smaps_entry(start - 64 * mib, start - 32 * mib, 32 * 1024)  # before the tensor: not counted
        + smaps_entry(start - 2 * mib, start + 2 * mib, 4096)  # half inside: half its 4 MiB
        + smaps_entry(start + 2 * mib, end, 6 * 1024)  # inside: all of it
        + smaps_entry(end, end + 4 * mib, 4096)  # after: not counted
    )
    assert host_pages.huge_page_bytes(t, str(smaps)) == 2 * mib + 6 * mib


def test_huge_page_bytes_of_a_real_mapping_is_within_its_size_and_none_without_smaps(tmp_path):
    t = host_pages.huge_page_tensor(16 << 20)
    t.fill_(1)
    huge = host_pages.huge_page_bytes(t)
    assert huge is not None and 0 <= huge <= t.numel()
    assert host_pages.huge_page_bytes(t, str(tmp_path / "missing")) is None
    assert "of 0.0 GiB on huge pages" in host_pages.describe(t)


def test_thp_setting_reads_the_bracketed_mode(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert host_pages.thp_setting(str(f)) == "madvise"
    assert host_pages.thp_setting(str(tmp_path / "missing")) == ""
