#!/usr/bin/env bash
# One batched session on the GPU machine: environment, micro-benchmarks, the
# end-to-end test on cuda, then bench cases. Full logs go under $OUT.
# usage: bench/device_run.sh STEP...
#   steps: env micro t2short t1nopf graphtests attn attnq sweep ring prof30 profdec profpre t2p t2g t1b t1p t1q4 t1auto cudatests w4tests t2mma w4sweep w4grid w4cmp e2e e2e-disk t1 t2 t3 t3q bloom fp16 disk llama70 qwen2 kvq profile grid30 grid175 rpc
# Planner (issue 4): `profile` measures this machine into $OUT/profile.json; gridN
# benches the planner's choice and its best-predicted competitors (bench/grid.py)
# with $PROFILE (default: the committed measured profile); GRID_FROM/GRID_TO pick lines.
# Disk tier (issue 6): `disk` writes dummy OPT-6.7B and OPT-30B INT4 shards under
# $STRATA_CACHE/offload, compares the weight store's reads with dd, then benches
# OPT-6.7B with every layer on disk and OPT-30B under a 4 GiB host budget, with the
# floor taken from the dd figure of the same run.
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
    attn) for dt in float16 bfloat16 float32; do python3 -m tools.bench_attention --batch 16 --dtype $dt --threads 16 --steps 10; done | tee "$OUT/attn.jsonl";;
    e2e) STRATA_TEST_DEVICE=cuda timeout 500 python3 -m pytest -q -x tests/deploy/test_serve_generate.py tests/deploy/test_disk_offload.py 2>&1 | tail -5;;
    t1) bench --model facebook/opt-30b --dummy --kv-offload --batch-size ${T1_B:-128} --micro-batches ${T1_M:-4} --kv-capacity-gb ${T1_KV:-92};;
    e2e-disk) STRATA_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -x tests/deploy/test_disk_offload.py 2>&1 | tail -5;;
    t3q) bench --model facebook/opt-175b --dummy --kv-bits ${T3Q_BITS:-auto} --profile ${PROFILE:-bench/profiles/nvidia-h200.json} ${T3Q_FLAGS:-};;
    t1p) bench --model facebook/opt-30b --dummy --kv-offload --profile ${PROFILE:-bench/profiles/nvidia-h200.json};;
    w4tests) STRATA_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q tests/compute_node/test_w4a16_wgmma.py tests/compute_node/test_w4a16_mma.py > "$OUT/w4tests.txt" 2>&1; tail -25 "$OUT/w4tests.txt";;
    t2short) bench --model facebook/opt-30b --dummy --profile ${PROFILE:-bench/profiles/nvidia-h200.json} --warmup short;;
    t1nopf) bench --kv-kernel-defines PF_TOKENS=0 --model facebook/opt-30b --dummy --kv-offload --profile ${PROFILE:-bench/profiles/nvidia-h200.json};;
    graphtests) STRATA_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q tests/compute_node/test_slot_graphs.py tests/compute_node/test_scheduler_in_process.py "tests/deploy/test_serve_generate.py::test_a_call_cancelled_mid_stream_leaves_the_server_serving_the_same_shapes" > "$OUT/graphtests.txt" 2>&1; tail -4 "$OUT/graphtests.txt";;
    t2mma) bench --w4a16-kernels mma --model facebook/opt-30b --dummy --profile ${PROFILE:-bench/profiles/nvidia-h200.json};;
    cudatests) STRATA_TEST_DEVICE=cuda timeout ${CT_TIMEOUT:-560} python3 -m pytest -q tests/compute_node tests/kv_store/test_native_attention.py tests/deploy/test_serve_generate.py 2>&1 | tail -4;;
    t1b) bench --model facebook/opt-30b --dummy --kv-offload --gpu-weight-share 1 ${T1_FLAGS:-};;
    w4grid) python3 bench/bench_w4a16.py --grid --ms ${W4_MS:-64} --shapes ${W4_SHAPES:-7168x7168,21504x7168,28672x7168,7168x28672} --grid-log "$OUT/w4grid.jsonl" ${W4_KNOBS:+--grid-knobs "$W4_KNOBS"} > "$OUT/w4grid.txt" 2>"$OUT/w4grid.err"; tail -6 "$OUT/w4grid.txt";;
    w4cmp) python3 bench/bench_w4a16.py --ms ${W4_MS:-64} --shapes ${W4_SHAPES:-7168x7168,21504x7168,28672x7168,7168x28672} --configs "${W4_CONFIGS:-[]}" --grid-log "$OUT/w4cmp.jsonl" > "$OUT/w4cmp.txt" 2>"$OUT/w4cmp.err"; grep "^#" "$OUT/w4cmp.txt";;
    profdec) python3 bench/profile_engine.py --batch ${P_B:-64} --micro-batches 1 --gen 8 --decode-prompt 512 > "$OUT/decode-prof.txt" 2>&1; tail -1 "$OUT/decode-prof.txt";;
    profpre) python3 bench/profile_engine.py --batch ${P_B:-64} --micro-batches 1 --prefill --gen 2 > "$OUT/prefill-prof.txt" 2>&1; tail -1 "$OUT/prefill-prof.txt";;
    w4sweep) python3 bench/bench_w4a16.py --sweep --ms ${W4_MS:-64} --shapes ${W4_SHAPES:-7168x7168,21504x7168,28672x7168,7168x28672} > "$OUT/w4sweep.txt" 2>"$OUT/w4sweep.err"; tail -8 "$OUT/w4sweep.txt";;
    t2p) bench --model facebook/opt-30b --dummy --profile ${PROFILE:-bench/profiles/nvidia-h200.json};;
    t2g) for f in --no-decode-graphs ""; do bench --model facebook/opt-30b --dummy --profile ${PROFILE:-bench/profiles/nvidia-h200.json} $f; done;;
    t1q4) bench --model facebook/opt-30b --dummy --kv-offload --kv-bits 4 --batch-size ${T1_B:-192} --profile ${PROFILE:-bench/profiles/nvidia-h200.json};;
    t1auto) bench --model facebook/opt-30b --dummy --kv-offload --kv-bits auto --profile ${PROFILE:-bench/profiles/nvidia-h200.json};;
    t2) bench --model facebook/opt-30b --dummy --batch-size ${T2_B:-56} --micro-batches ${T2_M:-1};;
    t3) bench --model facebook/opt-175b --dummy --kv-offload --batch-size ${T3_B:-24} --gpu-weight-share ${T3_S:-0.45} --micro-batches ${T3_M:-2} --kv-capacity-gb ${T3_KV:-58};;
    bloom) bench --model bigscience/bloom-7b1 --dummy --batch-size 32 --micro-batches 1;;
    sweep) python3 bench/attn_sweep.py | tee "$OUT/sweep.jsonl";;
    ring) STRATA_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q tests/compute_node/test_device_ring.py 2>&1 | tail -3;;
    prof30) python3 bench/profile_engine.py --batch ${P_B:-64} --micro-batches 1 --gen 4 > "$OUT/prof30-${P_TAG:-x}.txt" 2>&1; tail -1 "$OUT/prof30-${P_TAG:-x}.txt";;
    attnq) python3 -m tools.bench_attention --batch 16 --dtype bfloat16 --threads 16 --steps 10 --kv-bits 16,8,4 | tee "$OUT/attnq.jsonl";;
    disk)
      OFF=${STRATA_CACHE:-$HOME/.cache/strata}/offload
      for m in facebook/opt-6.7b facebook/opt-30b; do
        python3 -c "import time; t=time.time(); from tools.dummy.files import write_dummy_model as w; w('$m', 4, 64, '$OFF/${m//\//--}-q4g64'); print('$m shards ready in', round(time.time()-t, 1), 's')"
      done
      python3 bench/disk_read.py "$OFF/facebook--opt-30b-q4g64" | tee "$OUT/disk_read.jsonl"
      DD=$(python3 -c "import json;r=json.load(open('$OUT/disk_read.jsonl'));print(sum(r['dd_direct_bytes_per_s'])/2e9)")
      echo "dd GB/s: $DD"
      bench --model facebook/opt-6.7b --dummy --disk-offload --gpu-weight-share 0 --batch-size 16 --gen-len 16 --disk-read-gbps "$DD"
      bench --model facebook/opt-30b --dummy --disk-offload --host-budget-gb 4 --gpu-weight-share 0 --batch-size 16 --gen-len 4 --disk-read-gbps "$DD";;
    llama70) bench --model meta-llama/Llama-2-70b-hf --dummy --batch-size ${L70_B:-64} --gpu-weight-share 1 --micro-batches 1;;
    qwen2) bench --model Qwen/Qwen2-7B --dummy --batch-size ${Q_B:-64} --gpu-weight-share 1 --micro-batches 1;;
    kvq) for b in 16 8 4; do bench --model facebook/opt-6.7b --dummy --batch-size 64 --gpu-weight-share 1 --micro-batches 1 --kv-bits $b; done;;
    rpc) python3 bench/rpc_overhead.py --calls 1000 --step-s ${RPC_STEP_S:-1.855} --calls-per-step ${RPC_CALLS:-48} | tee "$OUT/rpc.jsonl";;
    profile) python3 -m deploy.cli profile --output "$OUT/profile.json" 2>&1 | tail -20;;
    grid30|grid175)
      m=facebook/opt-30b; extra=""; [ $step = grid175 ] && { m=facebook/opt-175b; extra="--batches 8,16,24,32,48"; }
      P=${PROFILE:-bench/profiles/nvidia-h200.json}
      python3 bench/grid.py $m --profile "$P" $extra | tee -a "$OUT/grid.txt" | sed -n "${GRID_FROM:-1},${GRID_TO:-8}p" |
        while read -r line; do bench --model $m --dummy --profile "$P" ${line%%#*} </dev/null; done;;
    fp16) bench --model facebook/opt-30b --dummy --quant-bits 16 --kv-offload --gpu-weight-share 0.5 --batch-size 16 --micro-batches 2 --kv-capacity-gb 14;;
  esac
done
