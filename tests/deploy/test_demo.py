"""`strata demo`, the README's main job, runs offline from an empty cache."""

import os

from serving import strata


def test_demo_makes_converts_serves_generates_and_reports_tokens_per_second(tmp_path):
    env_cache = str(tmp_path / "cache")
    old = os.environ.get("STRATA_CACHE")
    os.environ["STRATA_CACHE"] = env_cache
    try:
        out = strata("demo", timeout=600)
    finally:
        if old is None:
            os.environ.pop("STRATA_CACHE")
        else:
            os.environ["STRATA_CACHE"] = old
    assert out.returncode == 0, out.stderr[-2000:]
    assert "RANDOM" in out.stdout and "tokens/s" in out.stdout
    assert (tmp_path / "cache" / "demo" / "opt-demo-v2-int4" / "manifest.json").exists()
    lines = out.stdout.splitlines()
    texts = [line.split(" -> ", 1)[1] for line in lines if " -> " in line]
    assert len(texts) == 4 and "''" not in texts  # every generated id is in the tokenizer's vocabulary
    assert "" not in lines  # no blank lines, no progress bars
    assert "Writing model shards" not in out.stdout + out.stderr
