export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
for v in "" "-DPF_TOKENS=4" "-DPF_TOKENS=8" "-DPF_TOKENS=16" "-DPF_TOKENS=32" "-DPF_TOKENS=8 -DPF_HINT=3" "-DPF_TOKENS=16 -DPF_HINT=3" "" ; do
  STRATA_KV_CFLAGS="$v" python3 -m kv_store.bench_attention --batch 80 --threads 16 --kv-bits 16 --steps 10 --dtype bfloat16 | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); print('$v', r['step_ms'], r['kv_read_gbps'], r['dram_read_gbps'])"
done
