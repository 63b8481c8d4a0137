#!/usr/bin/env bash
# Device steps for the serving scheduler (issue 17) and the before/after comparison of
# the engine change: the code at .old/ (the session's starting commit, unpacked with
# `git archive BASE | tar -x -C .old`) against the working tree, same flags, same host.
# usage: bench/serve_run.sh STEP...   (full logs under $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RES="$OUT/bench.jsonl"
export PYTHONUNBUFFERED=1
new() { PYTHONPATH=$PWD${EXTRA_PATH:+:$EXTRA_PATH} timeout "${BENCH_TIMEOUT:-500}" python3 -m deploy.cli bench --json --output "$RES" "$@" 2>>"$OUT/bench.log" | tail -1 | cut -c1-400; }
old() { (cd .old && PYTHONPATH=$PWD${EXTRA_PATH:+:$EXTRA_PATH} timeout "${BENCH_TIMEOUT:-500}" python3 -m deploy.cli bench --json --output "$RES.old" "$@" 2>>"$OUT/bench-old.log" | tail -1 | cut -c1-300); }
T2="--model facebook/opt-30b --dummy --gpu-weight-share 1 --micro-batches 1 --batch-size ${T2_B:-128}"
T1="--model facebook/opt-30b --dummy --kv-offload --gpu-weight-share 1 --micro-batches ${T1_M:-4} --batch-size ${T1_B:-159} ${T1_X:-}"
T3="--model facebook/opt-175b --dummy --kv-bits 4 --gpu-weight-share 0 --micro-batches ${T3_M:-8} --batch-size ${T3_B:-89}"
# host memory facts for the KV store's cache: THP mode, free memory and page cache, THP fault counters
hostmem() { echo "kernel $(uname -r); THP $(cat /sys/kernel/mm/transparent_hugepage/enabled) defrag $(cat /sys/kernel/mm/transparent_hugepage/defrag)"
            grep -E "^(MemTotal|MemFree|MemAvailable|Cached|AnonHugePages|Shmem):" /proc/meminfo | tr -s ' ' | tr '\n' ';'; echo
            grep -E "^(thp_fault_alloc|thp_fault_fallback|compact_stall|compact_fail|compact_success|pgmajfault) " /proc/vmstat | tr '\n' ';'; echo; }
# every 5 s while $1 runs: free memory, page cache, the KV store's RSS and huge pages, each
# process's CPU seconds so far
sampler() { while kill -0 "$1" 2>/dev/null; do
              pid=$(pgrep -f "m kv_store" | head -1)
              cpu=$(for n in kv_store compute_node weight_store deploy.cli; do p=$(pgrep -f "python3 -m $n" | head -1)
                      [ -n "$p" ] && awk -v t=$(getconf CLK_TCK) -v n=$n '{printf "%s=%.1f ", n, ($14+$15)/t}' /proc/$p/stat 2>/dev/null; done)
              echo "$(date -u +%T) $(grep -E '^(MemFree|Cached):' /proc/meminfo | tr -s ' ' | tr '\n' ' ') kv: $( [ -n "$pid" ] && grep -E '^(Rss|AnonHugePages):' /proc/$pid/smaps_rollup 2>/dev/null | tr -s ' ' | tr '\n' ' ') cpu_s: $cpu"
              sleep 5; done; }
for step in "$@"; do
  echo "== $step $(date -u +%H:%M:%S)"
  case $step in
    env) nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; python3 -c "import torch,grpc;print(torch.__version__,grpc.__version__)";;
    cudatest) STRATA_TEST_DEVICE=cuda PYTHONPATH=$PWD:tests${EXTRA_PATH:+:$EXTRA_PATH} timeout ${CT_TIMEOUT:-200} python3 -m pytest -q -x -p no:cacheprovider tests/compute_node/test_scheduler.py -k "concurrent or one_length" > "$OUT/cudatest.txt" 2>&1; tail -3 "$OUT/cudatest.txt";;
    w4test) STRATA_TEST_DEVICE=cuda PYTHONPATH=$PWD:tests${EXTRA_PATH:+:$EXTRA_PATH} timeout 240 python3 -m pytest -q -p no:cacheprovider tests/compute_node/test_w4a16_wgmma.py > "$OUT/w4test.txt" 2>&1; tail -2 "$OUT/w4test.txt";;
    t2) new $T2 --clients ${S1_N:-256};;
    t2s) new $T2;;
    t2q) new $T2 --kv-bits ${T2_KV:-8};;
    datest) STRATA_TEST_DEVICE=cuda PYTHONPATH=$PWD:tests${EXTRA_PATH:+:$EXTRA_PATH} timeout ${CT_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider tests/compute_node/test_decode_attention.py tests/compute_node/test_slot_graphs.py tests/compute_node/test_slot_kv.py > "$OUT/datest.txt" 2>&1; tail -3 "$OUT/datest.txt";;
    dabench) for shape in "--rows 128" "--rows 32" "--rows 4" "--rows 64 --heads 128 --kv-heads 8 --columns 544"; do
           PYTHONPATH=$PWD timeout 120 python3 -m tools.bench_gpu_attention $shape; done 2>&1 | tee "$OUT/dabench.jsonl" | python3 -c "import sys,json;[print({k:d.get(k) for k in ('path','kv_bits','rows','kv_heads','qblock','ms','gbps','of_hbm','max_abs_diff_vs_before')}) if l.startswith('{') else print(l.rstrip()[:300]) for l in sys.stdin for d in [json.loads(l) if l.startswith('{') else {}]]";;
    t1s) new $T1;;
    t1b) new $T1 --prefill-tokens-per-pass ${T1_PB:-4096};;  # T1 with its prefill spread over passes that decode
    t1diag) hostmem; (sleep 1; new $T1) & job=$!; sampler $job > "$OUT/t1diag-samples.txt"; wait $job
            hostmem; grep -E "KV arena|still allocated" "$OUT/bench.log" | tail -3 | cut -c1-400; tail -4 "$OUT/t1diag-samples.txt";;
    pagecache) dd if=/dev/zero of=/tmp/strata-fill bs=1M count=${FILL_MB:-40000} status=none; sync; cat /tmp/strata-fill > /dev/null; hostmem;;
    unfill) rm -f /tmp/strata-fill; hostmem;;
    t2old) old $T2;;
    t1) new $T1 --clients ${S2_N:-256};;
    t1old) old $T1;;
    t3) new $T3 --clients ${S3_N:-128};;
    t3s) new $T3;;
    t3old) old $T3;;
    seamtest) STRATA_TEST_DEVICE=cuda PYTHONPATH=$PWD:tests${EXTRA_PATH:+:$EXTRA_PATH} timeout ${CT_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider tests/compute_node/test_device.py tests/compute_node/test_device_ring.py tests/compute_node/test_slot_graphs.py tests/compute_node/test_slot_kv.py > "$OUT/seamtest.txt" 2>&1; tail -3 "$OUT/seamtest.txt";;
    mixed) new $T2 --prompt-len 1024 --gen-len 256 --batch-size ${MIX_B:-48} --clients 512 --prompt-len-dist uniform:32:1024 --gen-len-dist uniform:16:256;;
    fixed512) new $T2 --batch-size ${MIX_B:-48} --prompt-len 1024 --gen-len 256 --clients 512 --prompt-len-dist 512 --gen-len-dist 32;;
    t1q) new --model facebook/opt-30b --dummy --kv-offload --kv-bits 4 --gpu-weight-share 1 --micro-batches ${T1Q_M:-2} --batch-size ${T1Q_B:-256};;
    batch) new $T2 --batch-requests ${BATCH_N:-2000};;
    cpu) lscpu | grep -E "Model name|Socket|NUMA node\(s\)|L3"; grep -o -w 'avx512[a-z_0-9]*\|amx[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
         PYTHONPATH=$PWD timeout 200 python3 -m tools.bench_attention --batch 8 --heads 56 --head-dim 128 --tokens 544 --dtype bfloat16 --threads 16 --layers 8 --kv-bits 16,8,4 2>&1 | tee "$OUT/kernel.jsonl" | cut -c1-300;;
    t3p) new --model facebook/opt-175b --dummy --profile bench/profiles/nvidia-h200.json --kv-bits auto;;
    t4) free -g | head -2; df -h /dev/shm | tail -1
        new --model meta-llama/Llama-3.1-405B --dummy --profile bench/profiles/nvidia-h200.json --kv-bits auto;;
    t3gpu) new --model facebook/opt-175b --dummy --kv-bits 4 --gpu-weight-share 1 --micro-batches 1 --batch-size ${T3G_B:-32};;
    cpudiag) nproc; cat /sys/fs/cgroup/cpu.max 2>/dev/null; lscpu | grep -E "^CPU\(s\)|Thread|Core|MHz"; python3 -c "import os;print(len(os.sched_getaffinity(0)))"
         for t in 1 4 8 16; do PYTHONPATH=$PWD timeout 100 python3 -m tools.bench_attention --batch ${CD_B:-64} --heads 56 --head-dim 128 --tokens 544 --dtype bfloat16 --threads $t --layers 4 --steps 5 --kv-bits 16,4; done 2>&1 | tee "$OUT/cpudiag.jsonl" | python3 -c "import sys,json;[print({k:d[k] for k in ('batch','threads','kv_bits','step_ms','kv_read_gbps')}) for d in map(json.loads,filter(lambda l:l.startswith('{'),sys.stdin))]"
         for t in 1 16; do PYTHONPATH=$PWD timeout 60 python3 -m tools.bench_attention --batch 1 --heads 56 --head-dim 128 --tokens 16 --dtype bfloat16 --threads $t --layers 8 --steps 50 --kv-bits 16,4; done 2>&1 | python3 -c "import sys,json;[print({k:d[k] for k in ('batch','threads','kv_bits','step_ms')}) for d in map(json.loads,filter(lambda l:l.startswith('{'),sys.stdin))]";;
    qxsweep) for defs in "" "QX_PF_BYTES=0" "QX_PF_BYTES=8192" "QX_PF_BYTES=16384" "PF_HINT=2" "PF_NEXT_ROW=0"; do
           PYTHONPATH=$PWD timeout 100 python3 -m tools.bench_attention --batch 64 --heads 56 --head-dim 128 --tokens 544 --dtype bfloat16 --threads 16 --layers 4 --steps 5 --kv-bits 4 ${defs:+--kv-kernel-defines "$defs"} | tail -1 | python3 -c "import sys,json;d=json.loads(sys.stdin.read());print('$defs', d['step_ms'], d['kv_read_gbps'])"; done 2>&1 | tee "$OUT/qxsweep.txt";;
    profile) PYTHONPATH=$PWD timeout 300 python3 -m deploy.cli profile --output "$OUT/profile.json" 2>&1 | tail -5;;
  esac
done
echo "== done $(date -u +%H:%M:%S)"
