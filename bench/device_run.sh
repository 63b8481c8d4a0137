#!/usr/bin/env bash
# One batched session on the GPU machine: environment, micro-benchmarks, the
# end-to-end test on cuda, then bench cases. Full logs go under $OUT.
# usage: bench/device_run.sh STEP...   (steps: env micro attn e2e t1 t2 t3 bloom fp16)
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RES="$OUT/bench.jsonl"
bench() { timeout "${BENCH_TIMEOUT:-400}" python3 -m deploy.cli bench --json --output "$RES" "$@" 2>>"$OUT/bench.log" | tail -1; }
for step in "$@"; do
  echo "== $step $(date -u +%H:%M:%S)"
  case $step in
    env) nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; python3 -c "import torch,grpc,google.protobuf as p,transformers as t;print(torch.__version__,grpc.__version__,p.__version__,t.__version__)";;
    micro) python3 bench/micro_gpu.py | tee "$OUT/micro.jsonl";;
    attn) for dt in float16 bfloat16 float32; do python3 -m kv_store.bench_attention --batch 16 --dtype $dt --threads 16 --steps 10; done | tee "$OUT/attn.jsonl";;
    e2e) STRATA_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -x tests/deploy/test_serve_generate.py 2>&1 | tail -5;;
    t1) bench --model facebook/opt-30b --dummy --kv-offload --batch-size ${T1_B:-128} --micro-batches ${T1_M:-4} --kv-capacity-gb ${T1_KV:-92};;
    t2) bench --model facebook/opt-30b --dummy --batch-size ${T2_B:-56} --micro-batches ${T2_M:-1};;
    t3) bench --model facebook/opt-175b --dummy --kv-offload --batch-size ${T3_B:-24} --gpu-weight-share ${T3_S:-0.45} --micro-batches ${T3_M:-2} --kv-capacity-gb ${T3_KV:-58};;
    bloom) bench --model bigscience/bloom-7b1 --dummy --batch-size 32 --micro-batches 1;;
    fp16) bench --model facebook/opt-30b --dummy --quant-bits 16 --kv-offload --gpu-weight-share 0.5 --batch-size 16 --micro-batches 2 --kv-capacity-gb 14;;
  esac
done
