#!/usr/bin/env bash
# The Fashion-MNIST runs of docs/results.md, one part per call (every part is resumable: run it again to continue).
#   bash scripts/results_fashion.sh cpu              # 24 runs: 4 optimizers x 3 seeds x clean / 40% label noise
#   bash scripts/results_fashion.sh cpu-rho          # 15 runs: SGD and SAM at rho 0.02, 0.05, 0.1, 0.2 x 3 seeds
#   bash scripts/results_fashion.sh gpu SEED         # 4 runs, ResNet-18, one seed (about 10 min on one H200)
#   bash scripts/results_fashion.sh gpu-noise SEED   # the same with 40% label noise
#   bash scripts/results_fashion.sh gpu-rho SEED     # SGD and SAM at the four rhos, one seed
#   bash scripts/results_fashion.sh report           # tables and plots of every folder from what has finished
# Environment: OUT (default runs), DATADIR (default: the Debian package's folder, which --dataset FashionMNIST
# reads without --datadir; on a machine without it copy the four .gz files into e.g. runs/fashion-data and pass
# DATADIR=runs/fashion-data), SSAM (default: .venv/bin/ssam if present, else ssam). Each part appends its command,
# machine and wall time to $OUT/<folder>/parts.log, which is what docs/results.md quotes.
set -euo pipefail
OUT=${OUT:-runs}
PART=${1:?usage: results_fashion.sh cpu|cpu-rho|gpu SEED|gpu-noise SEED|gpu-rho SEED|report}
SEED=${2:-}
if [[ -z ${SSAM:-} ]]; then
    if [[ -x .venv/bin/ssam ]]; then SSAM=.venv/bin/ssam; else SSAM=ssam; fi
fi
DATA=()
[[ -n ${DATADIR:-} ]] && DATA=(--datadir "$DATADIR")
CPU=recipes/fashion_mnist_cpu.yaml
GPU=recipes/fashion_mnist_gpu.yaml
RHOS=0.02,0.05,0.1,0.2

machine() {
    echo "host $(hostname), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
}

# part FOLDER ARGS...: one ssam compare call into $OUT/FOLDER, timed and logged.
part() {
    local folder=$OUT/$1; shift
    mkdir -p "$folder"
    local cmd=("$SSAM" compare "$@" "${DATA[@]}" --output "$folder")
    local start=$SECONDS rc=0
    { echo "== $(date -u +%FT%TZ) ${cmd[*]}"; machine; } | tee -a "$folder/parts.log"
    "${cmd[@]}" || rc=$?
    echo "== exit $rc after $((SECONDS - start)) s" | tee -a "$folder/parts.log"
    return $rc
}

need_seed() { [[ $SEED =~ ^[0-9]+$ ]] || { echo "results_fashion.sh $PART: give a seed, e.g. 1234" >&2; exit 2; }; }

case $PART in
    cpu)       part fashion_cpu --config $CPU ;;
    cpu-rho)   part fashion_cpu_rho --config $CPU --opts sgd,sam --rho $RHOS --label_noise 0 ;;
    gpu)       need_seed; part fashion_gpu --config $GPU --seeds "$SEED," ;;
    gpu-noise) need_seed; part fashion_gpu_noise40 --config $GPU --seeds "$SEED," --label_noise 0.4 ;;
    gpu-rho)   need_seed; part fashion_gpu_rho --config $GPU --seeds "$SEED," --opts sgd,sam --rho $RHOS ;;
    report)
        # --report_only over the seeds each folder is meant to hold; unfinished runs are listed as such.
        [[ -d $OUT/fashion_cpu ]] && part fashion_cpu --config $CPU --report_only
        [[ -d $OUT/fashion_cpu_rho ]] && part fashion_cpu_rho --config $CPU --opts sgd,sam --rho $RHOS \
            --label_noise 0 --report_only
        [[ -d $OUT/fashion_gpu ]] && part fashion_gpu --config $GPU --report_only
        [[ -d $OUT/fashion_gpu_noise40 ]] && part fashion_gpu_noise40 --config $GPU --label_noise 0.4 --report_only
        [[ -d $OUT/fashion_gpu_rho ]] && part fashion_gpu_rho --config $GPU --opts sgd,sam --rho $RHOS --report_only
        true ;;
    *) echo "results_fashion.sh: unknown part '$PART'; allowed: cpu, cpu-rho, gpu, gpu-noise, gpu-rho, report" >&2
       exit 2 ;;
esac
