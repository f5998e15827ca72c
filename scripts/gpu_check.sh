#!/usr/bin/env bash
# GPU checks and figures, on a machine with one CUDA GPU and this repo's Python deps.
#
#   bash scripts/gpu_check.sh [tests] [trunk] [train] [train_big] [job] [job_compiled]
#   (default: tests trunk train job)
#
#   tests  pytest -m gpu: grouped-GEMM MoE in bf16; the trunk's varlen flash attention against
#          its padded path (outputs and gradients); a Ray Train job with use_gpu (NCCL,
#          DeepSpeed bf16, ZeRO-2) through the three stages and the export
#   trunk  bf16 MFU of the `base` trunk, torch.compile'd, batch 64 and 128 x 512 tokens
#   train  `base` full model, pretraining objective: plain loop (bf16 autocast), eager and
#          compiled, and the DeepSpeed engine (bf16, NCCL, ZeRO-0 and -2); samples/s,
#          tokens/s, MFU, and a profile of 3 eager steps (kernel time vs wall time); and
#          the eager plain loop with the trunk's padded attention (the varlen A/B)
#   job    the real job: `python -m jobs.train`, `base`, one GPU worker, pretrain + align
#   job_compiled  the same with `compile=true` (OmniModel.compile_blocks on the worker)
#   train_big  plain loop and DeepSpeed ZeRO-2, compiled, activation checkpointing, batch 1024
#
# JSON lands in $RESULTS (default benchmarks/results/gpu); logs beside it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
RESULTS=${RESULTS:-benchmarks/results/gpu}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
parts=${*:-tests trunk train job}
status=0
run() {  # name, command...: runs one part, logs it, keeps going on failure
    local name=$1
    shift
    echo "=== $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee "$RESULTS/$name.log" | grep -v -E "Warning|warn\(" | tail -n 40
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" = 0 ] || status=1
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
for part in $parts; do
    case $part in
    tests)
        run tests "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
        ;;
    trunk)
        for b in 64 128; do
            run "trunk_b$b" "$PY" benchmarks/model_cost.py --device cuda --compile \
                --gpu-batch "$b" --gpu-seq 512 --reps 10 --out "$RESULTS/mfu_trunk_b$b.json"
        done
        ;;
    train)
        run train_eager_padded "$PY" benchmarks/train_overhead.py --plain-only --device cuda \
            --bf16 --model base --batch 256 --steps 40 --warmup 10 --padded-attention \
            --out "$RESULTS/train_base_b256_eager_padded.json"
        run train_eager "$PY" benchmarks/train_overhead.py --plain-only --device cuda --bf16 \
            --model base --batch 256 --steps 40 --warmup 10 --deepspeed --zero-stages 0,2 \
            --profile --sync-debug --out "$RESULTS/train_base_b256_eager.json"
        run train_compiled "$PY" benchmarks/train_overhead.py --plain-only --device cuda --bf16 \
            --model base --batch 256 --steps 40 --warmup 10 --compile --deepspeed \
            --zero-stages 2 --out "$RESULTS/train_base_b256_compiled.json"
        ;;
    train_big)
        run train_big "$PY" benchmarks/train_overhead.py --plain-only --device cuda --bf16 \
            --model base --batch 1024 --steps 30 --warmup 10 --compile --checkpoint \
            --deepspeed --zero-stages 2 --out "$RESULTS/train_base_b1024_ckpt_compiled.json"
        ;;
    job | job_compiled)
        shards=/tmp/omniray_gpu_shards
        extra=()
        [ "$part" = job_compiled ] && extra=(compile=true)
        run job_shards "$PY" -c "from jobs.training.synthetic import write_synthetic_shards as w; \
print(w('$shards', n=2048, seed=0))"
        run "$part" "$PY" -m jobs.train --config configs/train/base_gpu.yaml --stages pretrain,align \
            "data.shards_dir=$shards/" runs_dir=/tmp/omniray_gpu_runs scaling.num_workers=1 \
            scaling.cpus_per_worker=8 data.batch_size=256 pretrain.steps=60 align.steps=40 \
            pretrain.checkpoint_every=1000 align.checkpoint_every=1000 log_every=10 \
            export_at_end=false "${extra[@]}"
        cp /tmp/omniray_gpu_runs/base_gpu/summary.json "$RESULTS/${part}_base_summary.json" || true
        cp /tmp/omniray_gpu_runs/base_gpu/metrics.jsonl "$RESULTS/${part}_base_metrics.jsonl" || true
        rm -rf /tmp/omniray_gpu_runs
        ;;
    *)
        echo "unknown part: $part (tests trunk train train_big job job_compiled)" >&2
        exit 2
        ;;
    esac
done
exit $status
