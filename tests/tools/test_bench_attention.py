"""The kernel benchmark on tiny sizes: one line per KV precision, bytes read as
stored, bandwidth-equivalent GB/s = bfloat16 bytes / step time, DRAM measured once."""

import json

import pytest

from tools import bench_attention

# 2 sequences x 2 heads; 20 tokens + 3 warm-up steps, then 2 timed steps: 24.5 tokens a step on average
VECTORS = 2 * 2 * 2 * 24.5  # K and V per token and head
BF16 = VECTORS * 32 * 2


@pytest.mark.parametrize("bits,vector_bytes", [(16, 32 * 4), (8, 32 + 4), (4, 16 + 4)])  # float32 cache at 16
def test_each_precision_reports_bytes_read_and_bandwidth_equivalent(bits, vector_bytes):
    row = bench_attention.bench(batch=2, heads=2, head_dim=32, tokens=20, dtype="float32", threads=1, steps=2,
                                kv_bits=bits, dram=50.0)
    assert row["kv_bits"] == bits and row["kv_group"] == (0 if bits == 16 else 32)
    assert row["bytes_per_step"] == VECTORS * vector_bytes
    assert row["bf16_bytes_per_step"] == BF16
    assert row["step_s"] > 0 and row["step_ms"] == pytest.approx(row["step_s"] * 1e3, rel=1e-3)
    assert row["bf16_equiv_gbps"] == pytest.approx(BF16 / row["step_s"] / 1e9, rel=1e-3)
    assert row["kv_read_gbps"] == pytest.approx(row["bytes_per_step"] / row["step_s"] / 1e9, rel=1e-3)
    assert row["dram_read_gbps"] == 50.0
    assert row["fraction_of_dram"] == pytest.approx(row["kv_read_gbps"] / 50.0, rel=1e-2)
    assert row["kv_read_gbps"] > 0 and row["bf16_equiv_gbps"] > 0
    assert row["cpu"] and row["date"].startswith("20")  # what it ran on, and when


def test_cli_prints_one_json_line_per_precision_against_one_dram_measurement(capsys):
    bench_attention.main(["--batch", "2", "--heads", "2", "--head-dim", "32", "--tokens", "20", "--steps", "2",
                          "--threads", "1", "--dtype", "bfloat16", "--kv-group", "16", "--dram-bytes", str(1 << 20)])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["kv_bits"] for r in rows] == [16, 8, 4]
    assert [r["kv_group"] for r in rows] == [0, 16, 16]
    assert len({r["dram_read_gbps"] for r in rows}) == 1 and rows[0]["dram_read_gbps"] > 0
    # at 16 bits a bfloat16 cache reads exactly the bfloat16 bytes; quantized ones read fewer
    assert rows[0]["bytes_per_step"] == rows[0]["bf16_bytes_per_step"]
    assert rows[0]["kv_read_gbps"] == rows[0]["bf16_equiv_gbps"]
    assert rows[0]["bytes_per_step"] > rows[1]["bytes_per_step"] > rows[2]["bytes_per_step"]


def test_profile_rates_time_the_kernel_the_kv_store_runs_for_each_precision(monkeypatch):
    """`strata profile` measures the KV store's own kernel (as the service creates it)
    over bf16, INT8 and INT4 caches: stored bytes per second, and which kernel ran."""
    calls = []
    real = bench_attention.bench

    def spy(*args, **kw):
        calls.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(bench_attention, "bench", spy)
    monkeypatch.setattr(bench_attention, "QUICK_SHAPE",
                        {"batch": 2, "heads": 2, "head_dim": 64, "tokens": 20, "layers": 2})
    out = bench_attention.profile_rates(threads=1, quick=True, dram=50.0)
    assert [c["kv_bits"] for c in calls] == [16, 8, 4]
    assert all(c["attention"] == "native" and c["layers"] == 2 and c["dram"] == 50.0 for c in calls)
    for field in ("cpu_attention_bytes_per_s", "cpu_attention_int8_bytes_per_s", "cpu_attention_int4_bytes_per_s"):
        assert out[field] > 0
    assert out["cpu_attention_kernel"] in ("native", "sdpa")
