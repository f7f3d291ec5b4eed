#!/usr/bin/env bash
# On a machine with two GPUs: data-parallel and fsdp throughput of a real training run on the
# bundled digits (1 vs 2 GPUs), and whether resume is bitwise exact there (BENCHMARKS.md).
#   OUT=results bash scripts/gpu_scaling.sh
set -u
OUT=${OUT:-scaling_results}; mkdir -p "$OUT"
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export PYTHONUNBUFFERED=1

# Throughput: DiG-B/2 (131 M params) on 32x32 digits (256 tokens), bf16, global batch 256.
B2="--config configs/digits.py --config.model.name=DiG-B/2 --config.model.depth=12
  --config.model.hidden_size=768 --config.model.num_heads=12 --config.model.dtype=bfloat16
  --config.train.global_batch_size=256 --config.train.total_steps=100 --config.train.log_every=20
  --config.train.checkpoint_every=100000 --config.train.warmup_steps=10"
throughput() {  # name, extra flags...
  local name=$1; shift
  timeout 400 python train.py $B2 --workdir /tmp/scale_$name "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$?"
  cp /tmp/scale_$name/metrics.jsonl "$OUT/$name.jsonl"
}
CUDA_VISIBLE_DEVICES=0 throughput gpu1
throughput gpu2_data --config.mesh.data=2
throughput gpu2_fsdp --config.mesh.data=1 --config.mesh.fsdp=2 --config.mesh.fsdp_min_size_mb=1

# Resume: 2 GPUs, 60 steps straight vs 30 + restart + 30, and a repeat of the straight run.
S2="--config configs/digits.py --config.model.name=DiG-S/2 --config.model.depth=6
  --config.train.global_batch_size=64 --config.train.log_every=10
  --config.train.checkpoint_every=100000 --config.mesh.data=2"
resume_check() {  # label; XLA_FLAGS decide determinism
  local d=/tmp/resume_$1
  timeout 200 python train.py $S2 --config.train.total_steps=60 --workdir $d/straight > /dev/null 2>&1
  timeout 200 python train.py $S2 --config.train.total_steps=60 --workdir $d/repeat > /dev/null 2>&1
  timeout 200 python train.py $S2 --config.train.total_steps=30 --workdir $d/resumed > /dev/null 2>&1
  timeout 200 python train.py $S2 --config.train.total_steps=60 --workdir $d/resumed > /dev/null 2>&1
  echo "[$1] straight vs repeat:";  python scripts/compare_runs.py $d/straight $d/repeat
  echo "[$1] straight vs resumed:"; python scripts/compare_runs.py $d/straight $d/resumed
}
resume_check default 2>&1 | tee "$OUT/resume.txt"
if grep -q "bitwise equal: False" "$OUT/resume.txt"; then  # then: does XLA's deterministic mode fix it?
  XLA_FLAGS=--xla_gpu_deterministic_ops=true resume_check deterministic 2>&1 | tee -a "$OUT/resume.txt"
fi
