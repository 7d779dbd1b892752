#!/usr/bin/env bash
# The GPU checks of the issues, as one script for a lent CUDA machine (torch preinstalled there; run from the repo
# root). Writes logs and bench.json files under ${OUT:-/tmp/ssam-gpu}. CI never runs this: it has no GPU.
#   bash scripts/gpu_check.sh                  # everything
#   bash scripts/gpu_check.sh checks bench     # only these parts (checks, train, bench, skip, compile)
# Parts run in the order above; each writes its results as soon as it ends, so a run cut short keeps what finished.
set -uo pipefail
OUT=${OUT:-/tmp/ssam-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
PARTS=${*:-checks train bench skip compile}
want() { [[ " $PARTS " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
status=0
run() { echo "== $*"; "$@" || { echo "FAILED ($?): $*"; status=1; }; }
# logged NAME CMD...: run CMD, its output also in $OUT/NAME.log.
logged() { local name=$1; shift; echo "== $(date +%T) $*"; "$@" 2>&1 | tee "$OUT/$name.log"
           [[ ${PIPESTATUS[0]} == 0 ]] || { echo "FAILED: $*"; status=1; }; }
B="$PY -m ssam.bench --device cuda --model resnet18 --dataset CIFAR10"

# Correctness on CUDA, host synchronisation, radix select and SSAM-D update timings.
want checks && logged checks $PY scripts/gpu_checks.py
# Training on CUDA: fp16 with the two-pass scaler, bf16 + channels_last + on-device data, compile, grad accumulation.
if want train; then
    T="$PY -m ssam.cli train --device cuda --quiet --output_dir $OUT/runs --epochs 2"
    run $T --output_name fp16 --opt ssamf-sgd --sparsity 0.5 --num_samples 64 --update_freq 1 --amp fp16
    run $T --output_name bf16 --opt ssamd-sgd --sparsity 0.5 --update_freq 1 --amp bf16 --channels_last --gpu_data
    run $T --output_name accum --opt sam-adamw --lr 1e-3 --grad_accum 4 --freeze_bn_second_pass
    run $T --output_name compile --opt sam-sgd --compile --limit_train_batches 10
    for r in fp16 bf16 accum compile; do tail -n 2 "$OUT/runs/$r/log.txt" 2>/dev/null; done
fi
# Issue 5's benchmark: ResNet-18, CIFAR shape, batch 64 (fp32 steps; images/s for fp32 / bf16 / bf16+channels_last;
# GPULoader against a DataLoader), then batch 256 for a less launch-bound reading.
if want bench; then
    logged bench-b64 $B --batch_size 64 --steps 30 --warmup 5 --output "$OUT/bench-b64"
    logged bench-b256 $B --batch_size 256 --steps 20 --warmup 5 --no-data_loader --no-throughput \
        --fisher_methods vmap,hooks --output "$OUT/bench-b256"
fi
# Issue 12's skip benchmark at batch 128: SSAM-F steps whose first pass skips the dead tensors (element, channel,
# tensor at 0.5/0.9/0.99, cost_aware on/off, 2:4, two hand-made masks) against the SAM step, interleaved; one model
# a run, so the ResNet-18 table is saved before WRN-28-10 starts (not yet run on a GPU: SKIP_WRN_TIMEOUT caps it).
if want skip; then
    S="$PY -m ssam.bench --device cuda --dataset CIFAR10 --section skip --batch_size 128"
    logged skip-resnet18 $S --model resnet18 --steps 30 --warmup 5 --output "$OUT/skip-resnet18"
    logged skip-wrn28-10 timeout "${SKIP_WRN_TIMEOUT:-300}" $S --model wideresnet28x10 --steps 15 --warmup 3 \
        --output "$OUT/skip-wrn28-10"
fi
# Compiled bf16 + channels_last steps (the compiled row of the images/s table); compilation may take minutes.
if want compile; then
    logged bench-compile timeout "${COMPILE_TIMEOUT:-240}" $B --batch_size 64 --steps 30 --warmup 3 --amp \
        --channels_last --compile --no-throughput --no-data_loader --fisher_methods hooks --output "$OUT/bench-compile"
fi
exit $status
