#!/usr/bin/env bash
# The KV store's bf16 kernel under compile-time prefetch variants (--kv-kernel-defines), at
# T1's call shape (80 sequences x 56 heads x 544 tokens) over LAYERS layers a step.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
LAYERS=${LAYERS:-8}
for v in "PF_TOKENS=0" "" "PF_NEXT_ROW=1" "PF_TOKENS=32" "PF_TOKENS=32 PF_HINT=2" "PF_TOKENS=64 PF_HINT=2" "PF_TOKENS=32 PF_HINT=2 PF_NEXT_ROW=1" "PF_TOKENS=0" ""; do
  python3 -m tools.bench_attention --kv-kernel-defines "$v" --batch 80 --threads 16 --kv-bits 16 --steps 5 \
    --layers "$LAYERS" --dtype bfloat16 |
    python3 -c "import json,sys; r=json.loads(sys.stdin.read()); print('${v:-default}', r['step_ms'], r['kv_read_gbps'], r['dram_read_gbps'])"
done
