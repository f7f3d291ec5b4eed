#!/usr/bin/env bash
# On a machine with two GPUs: throughput of a real training run on the bundled digits on 1 vs 2
# GPUs, and whether training is bitwise reproducible / resume exact there (BENCHMARKS.md).
#   OUT=results bash scripts/gpu_scaling.sh [throughput] [weak] [resume] [determinism]
# (no argument: throughput and resume). Metrics land in $OUT/<name>.jsonl, comparisons in .txt.
set -u
OUT=${OUT:-scaling_results}; mkdir -p "$OUT"
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export PYTHONUNBUFFERED=1

# DiG-B/2 (131 M params) on 32x32 digits (256 tokens), bf16 compute, 100 steps.
B2="--config configs/digits.py --config.model.name=DiG-B/2 --config.model.depth=12
  --config.model.hidden_size=768 --config.model.num_heads=12 --config.model.dtype=bfloat16
  --config.train.lr_schedule=constant --config.train.total_steps=100 --config.train.log_every=20
  --config.train.checkpoint_every=100000 --config.train.warmup_steps=10"
throughput() {  # name, extra flags...
  local name=$1; shift
  timeout 400 python train.py $B2 --workdir /tmp/scale_$name "$@" > /dev/null 2>&1
  echo "$name rc=$?"
  cp /tmp/scale_$name/metrics.jsonl "$OUT/$name.jsonl"
}

# DiG-S/2 depth 6, batch 64; compares a straight run with a repeat and with a resumed one.
S2="--config configs/digits.py --config.model.name=DiG-S/2 --config.model.depth=6
  --config.model.hidden_size=384 --config.model.num_heads=6 --config.train.lr_schedule=constant
  --config.train.global_batch_size=64 --config.train.log_every=10 --config.train.checkpoint_every=100000"
straight_and_repeat() {  # label, extra flags...
  local d=/tmp/repro_$1; shift
  for run in straight repeat; do
    timeout 200 python train.py $S2 "$@" --config.train.total_steps=60 --workdir $d/$run > /dev/null 2>&1
  done
  echo "straight vs repeat:"; python scripts/compare_runs.py $d/straight $d/repeat
}

for part in ${@:-throughput resume}; do
  case $part in
    throughput)  # global batch 256 on 1 GPU, then split over 2 (data parallel and fsdp)
      CUDA_VISIBLE_DEVICES=0 throughput gpu1 --config.train.global_batch_size=256
      throughput gpu2_data --config.train.global_batch_size=256 --config.mesh.data=2
      throughput gpu2_fsdp --config.train.global_batch_size=256 --config.mesh.data=1 \
        --config.mesh.fsdp=2 --config.mesh.fsdp_min_size_mb=1 ;;
    weak)  # the same per-GPU batch: 256 on 1 GPU vs 512 on 2; and more reader threads
      CUDA_VISIBLE_DEVICES=0 throughput gpu1_b256 --config.train.global_batch_size=256
      throughput gpu2_b512 --config.train.global_batch_size=512 --config.mesh.data=2
      throughput gpu2_b256_threads8 --config.train.global_batch_size=256 --config.mesh.data=2 \
        --config.data.num_threads=8 ;;
    resume)  # 2 GPUs: 60 steps straight vs 30 + restart + 30
      d=/tmp/repro_resume
      straight_and_repeat resume --config.mesh.data=2 2>&1 | tee "$OUT/resume.txt"
      timeout 200 python train.py $S2 --config.mesh.data=2 --config.train.total_steps=30 --workdir $d/resumed > /dev/null 2>&1
      timeout 200 python train.py $S2 --config.mesh.data=2 --config.train.total_steps=60 --workdir $d/resumed > /dev/null 2>&1
      { echo "straight vs resumed:"; python scripts/compare_runs.py $d/straight $d/resumed; } 2>&1 | tee -a "$OUT/resume.txt" ;;
    determinism)  # 1 GPU: is a step reproducible without NCCL, and without the Pallas kernel?
      for backend in auto reference; do
        echo "[1 GPU, gla_backend=$backend]"
        CUDA_VISIBLE_DEVICES=0 straight_and_repeat 1gpu_$backend --config.model.gla_backend=$backend
      done 2>&1 | tee "$OUT/determinism.txt" ;;
  esac
done
