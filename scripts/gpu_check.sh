#!/usr/bin/env bash
# The GPU checks of the issues, as one script for a lent CUDA machine (torch preinstalled there; run from the repo
# root). Writes logs and bench.json under ${OUT:-/tmp/ssam-gpu}. CI never runs this: it has no GPU.
set -uo pipefail
OUT=${OUT:-/tmp/ssam-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
status=0
run() { echo "== $*"; "$@" || { echo "FAILED ($?): $*"; status=1; }; }

run $PY scripts/gpu_checks.py
# Training on CUDA: fp16 with the two-pass scaler, bf16 + channels_last + on-device data, compile, grad accumulation.
T="$PY -m ssam.cli train --device cuda --quiet --output_dir $OUT/runs --epochs 2"
run $T --output_name fp16 --opt ssamf-sgd --sparsity 0.5 --num_samples 64 --update_freq 1 --amp fp16
run $T --output_name bf16 --opt ssamd-sgd --sparsity 0.5 --update_freq 1 --amp bf16 --channels_last --gpu_data
run $T --output_name accum --opt sam-adamw --lr 1e-3 --grad_accum 4 --freeze_bn_second_pass
run $T --output_name compile --opt sam-sgd --compile --limit_train_batches 10
for r in fp16 bf16 accum compile; do tail -n 2 "$OUT/runs/$r/log.txt" 2>/dev/null; done
# Benchmarks (issue 5): ResNet18, CIFAR shape.
run $PY -m ssam.bench --device cuda --model resnet18 --dataset CIFAR10 --batch_size 128 --steps 20 --warmup 5 \
    --amp --channels_last --compile --data_loader --output "$OUT"
exit $status
