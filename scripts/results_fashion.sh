#!/usr/bin/env bash
# The Fashion-MNIST runs of docs/results.md, one part per call (every part is resumable: run it again to continue).
#   bash scripts/results_fashion.sh cpu [SEED]       # 8 runs a seed: 4 optimizers x clean / 40% label noise (all 3 seeds without SEED)
#   bash scripts/results_fashion.sh cpu-rho [SEED]   # 5 runs a seed: SGD and SAM at rho 0.02, 0.05, 0.1, 0.2
#   bash scripts/results_fashion.sh cpu-noise-rho [SEED]  # 4 runs a seed: SGD and SAM at rho 0.02, 0.05, 0.1, 40% label noise
#   bash scripts/results_fashion.sh mem [SEED]       # memorization regime (MLP, 10,000 images, 40% noise): 5 optimizers
#   bash scripts/results_fashion.sh mem-clean [SEED] # the same 5 on clean labels (rho 0.05)
#   bash scripts/results_fashion.sh mem-rho [SEED]   # SAM and SSAM-F 0.5 at rho 0.05, 0.1, 0.2, 0.3, 40% noise
#   bash scripts/results_fashion.sh mem-full [SEED]  # the headline: all 60,000 images (55,000 trained), 50 epochs
#   bash scripts/results_fashion.sh mem-sched [SEED] # ascent schedules: SGD, SAM, SSAM-F 0.5 x 9 schedules, 40% noise
#   bash scripts/results_fashion.sh mem-sched-clean [SEED]  # the same on clean labels (rho 0.05)
#   bash scripts/results_fashion.sh mem-full-sched [SEED]  # the best schedule (LookSAM every 2nd step) on the headline
#   bash scripts/results_fashion.sh mem-m [SEED]     # m-sharpness: SAM with one ascent per 32, 8 and 1 examples
#   bash scripts/results_fashion.sh mem-m-ssamf M [SEED]  # SSAM-F 0.5 at the m that mem-m found best
#   bash scripts/results_fashion.sh mem-m1-rho [SEED]  # after mem-m (not fixed before it): SAM at m = 1, rho 0.01-0.05
#   bash scripts/results_fashion.sh mem-rho-ssamd [SEED]  # after mem-rho: SSAM-D 0.5 at rho 0.05, 0.1, 0.3 (0.2: mem's)
#   bash scripts/results_fashion.sh mem-full-rho [SEED]   # after mem-rho: SAM, SSAM-F, SSAM-D at rho 0.3 on the headline
#   bash scripts/results_fashion.sh mem-full-rho-wide RHO [SEED]  # after mem-full-rho: the same three at RHO 0.4 or 0.5
#   bash scripts/results_fashion.sh mem-full-rho-ssamd RHO [SEED] # after -wide chose SSAM-D's largest rho: RHO 0.6 or 0.7
#   bash scripts/results_fashion.sh cheap DIRECTION [SEED]  # a cheap ascent on every step (SAM, 40% noise) over its rho grid:
#                                                   # subbatch:0.25 | subbatch:0.125 | previous | momentum | msam
#   bash scripts/results_fashion.sh cheap-wide DIRECTION RHO [SEED]  # after cheap chose a grid's largest rho: two beyond it
#   bash scripts/results_fashion.sh saf [SEED]       # SAF (no ascent: KL to the logits of 3 epochs ago), lambda 0.1, 0.3, 1
#   bash scripts/results_fashion.sh mesa [SEED]      # MESA (KL to an EMA teacher, decay 0.999), lambda 0.3, 0.8, 2
#   bash scripts/results_fashion.sh saf-wide|mesa-wide LAMBDA [SEED]  # after saf/mesa chose the grid's largest lambda
#   bash scripts/results_fashion.sh cheap-sparse DIRECTION [SEED]  # after cheap: SSAM-F 0.5 and SSAM-D 0.5 with the chosen direction, its grid
#   bash scripts/results_fashion.sh cheap-clean DIRECTION RHO [SEED]  # after cheap: the chosen setting on clean labels
#   bash scripts/results_fashion.sh cheap-full DIRECTION RHO [SEED]   # after cheap: the chosen setting on the headline (60,000)
#   bash scripts/results_fashion.sh cnn-cheap DIRECTION [SEED]  # after cheap: a direction on the CNN over its grid
#   bash scripts/results_fashion.sh cnn-more RHO_SAM RHO_SSAMF [SEED]  # after cnn: channel and 2:4 SSAM-F with skipping,
#                                                   # LookSAM:2, SAM with pass two's BN statistics frozen, at the chosen radii
#   bash scripts/results_fashion.sh cnn [SEED]       # the CNN with BatchNorm (cnn_bn): SGD, SAM, SSAM-F, SSAM-D x rho 0.1, 0.2, 0.4
#   bash scripts/results_fashion.sh noise RATE [SEED]  # the noise-rate curve on the MLP: SGD, SAM, SSAM-F x rho 0.1-0.3 at RATE 0, 0.2 or 0.6
#   bash scripts/results_fashion.sh gpu SEED         # 4 runs, ResNet-18, one seed (about 10 min on one H200)
#   bash scripts/results_fashion.sh gpu-noise SEED   # the same with 40% label noise
#   bash scripts/results_fashion.sh gpu-rho SEED     # SGD and SAM at the four rhos, one seed
#   bash scripts/results_fashion.sh report           # tables and plots of every folder from what has finished
#   bash scripts/results_fashion.sh archive          # copy the finished runs' results (no checkpoints) to docs/results/data
#   bash scripts/results_fashion.sh restore          # copy them back into $OUT, so that finished runs are not retrained
# Environment: OUT (default runs), PY (the Python that imports ssam; default .venv/bin/python, else python3), DATADIR (default: the Debian package's folder, which --dataset FashionMNIST
# reads without --datadir; on a machine without it copy the four .gz files into e.g. runs/fashion-data and pass
# DATADIR=runs/fashion-data), SSAM (default: .venv/bin/ssam if present, else ssam), JOBS (runs at once; default:
# the recipe's 2), ARCHIVE (default docs/results/data: where archive writes and restore reads). Each part appends
# its command, machine and wall time to $OUT/<folder>/parts.log, which is what docs/results.md quotes. A CPU part
# of one seed fits in one sitting; archive keeps what finished across clones (a run folder without its
# checkpoints: summary, metrics, masks, Hessian, config and log, a few kB).
set -euo pipefail
OUT=${OUT:-runs}
PART=${1:?usage: results_fashion.sh mem|mem-clean|mem-rho|mem-full|mem-sched|mem-sched-clean|mem-m [SEED]|mem-m-ssamf M [SEED]|mem-m1-rho|mem-rho-ssamd|mem-full-sched|mem-full-rho [SEED]|mem-full-rho-wide 0.4|0.5 [SEED]|mem-full-rho-ssamd 0.6|0.7 [SEED]|cpu [SEED]|cpu-rho [SEED]|cpu-noise-rho [SEED]|gpu SEED|gpu-noise SEED|gpu-rho SEED|report|archive|restore}
SEED=${2:-}
if [[ -z ${SSAM:-} ]]; then
    if [[ -x .venv/bin/ssam ]]; then SSAM=.venv/bin/ssam; else SSAM=ssam; fi
fi
if [[ -z ${PY:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
# What a finished run is and which of its files an archive keeps are ssam.runfolder's rules, not written again here.
runfolder() { "$PY" -m ssam.runfolder "$@"; }
# The parts that run Python say so at once when it cannot import ssam (a clone without `make setup`), not per file.
need_ssam() {
    "$PY" -c "import ssam" 2>/dev/null && return 0
    echo "results_fashion.sh $PART: $PY cannot import ssam; run \`make setup\` first (or set PY to a Python that has it)" >&2
    exit 2
}
DATA=()
[[ -n ${DATADIR:-} ]] && DATA=(--datadir "$DATADIR")
[[ -n ${JOBS:-} ]] && DATA+=(--jobs "$JOBS")
ARCHIVE=${ARCHIVE:-docs/results/data}
FOLDERS="fashion_cpu fashion_cpu_rho fashion_cpu_noise_rho fashion_gpu fashion_gpu_noise40 fashion_gpu_rho
fashion_mem fashion_mem_clean fashion_mem_rho fashion_mem_full fashion_mem_sched fashion_mem_sched_clean fashion_mem_m fashion_mem_m_ssamf fashion_mem_m1_rho fashion_mem_full_sched
fashion_mem_rho_ssamd fashion_mem_full_rho fashion_mem_full_rho0.4 fashion_mem_full_rho0.5
fashion_mem_full_rho0.6 fashion_mem_full_rho0.7
fashion_cnn fashion_mem_noise0 fashion_mem_noise0.2 fashion_mem_noise0.6
fashion_mem_cheap_subbatch-0.25 fashion_mem_cheap_subbatch-0.125 fashion_mem_cheap_previous fashion_mem_cheap_momentum
fashion_mem_cheap_msam fashion_cnn_more fashion_cnn_looksam fashion_cnn_bnfrozen fashion_mem_saf fashion_mem_mesa
fashion_mem_saf_l3 fashion_mem_saf_l10 fashion_mem_saf_l30 fashion_mem_saf_l100 fashion_mem_mesa_l5 fashion_mem_mesa_l10"
# The follow-ups of the cheap ascents: one folder per direction (run names carry the rho and seed, not the direction).
for d in subbatch-0.25 subbatch-0.125 previous momentum msam; do
    FOLDERS+=" fashion_mem_cheap_sparse_$d fashion_mem_cheap_clean_$d fashion_mem_cheap_full_$d fashion_cnn_cheap_$d"
    for r in 0.3 0.35 0.5 0.6 10 30; do FOLDERS+=" fashion_mem_cheap_${d}_rho$r"; done
done
MEM=recipes/fashion_mnist_memorization.yaml
CNN=recipes/fashion_mnist_memorization_cnn.yaml
MEM_RHOS=0.05,0.1,0.2,0.3
# The noise-rate curve's grid (fixed before its runs): the 40% sweep's without 0.05, which kept little of SAM's gain
# there, so that two rates fit one sitting of two cores.
NOISE_CURVE_RHOS=0.1,0.2,0.3
MEM_FULL=(--train_subset 60000 --val_split 5000 --epochs 50)
MEM_SCHEDULES=none,every:2,every:5,looksam:2,looksam:5,aesam:0,aesam:1,late:0.5,late:0.25
CPU=recipes/fashion_mnist_cpu.yaml
GPU=recipes/fashion_mnist_gpu.yaml
RHOS=0.02,0.05,0.1,0.2
NOISE_RHOS=0.02,0.05,0.1   # under label noise: rho 0.2 already cost SAM 3 points on clean labels
# The cheap ascents' radius grids (fixed before their seeds ran; the point is chosen by mean final validation
# accuracy, scripts/pick_rho.py): around the radius the plain-loop pilot found for each (ANCHORS.md: the sub-batch
# wanted more than SAM's 0.2, the one-pass directions collapsed at 0.3), and for msam spanning its published rho 3.
# The radii of a direction's cheap-wide follow-up (beyond its grid's largest).
wide_rhos() {
    case $1 in subbatch:0.25|subbatch:0.125) echo 0.5 0.6 ;; previous|momentum) echo 0.3 0.35 ;; msam) echo 10 30 ;; esac
}
cheap_rhos() {
    case $1 in
        subbatch:0.25|subbatch:0.125) echo 0.2,0.3,0.4 ;;
        previous|momentum)            echo 0.15,0.2,0.25 ;;
        msam)                         echo 0.3,1,3 ;;
        *) echo "results_fashion.sh $PART: got direction '$1'; allowed: subbatch:0.25 or subbatch:0.125 or previous or momentum or msam" >&2; exit 2 ;;
    esac
}

machine() {
    echo "host $(hostname), $(nproc --all) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
}

# part FOLDER ARGS...: one ssam compare call into $OUT/FOLDER, timed and logged.
part() {
    need_ssam
    local folder=$OUT/$1; shift
    mkdir -p "$folder"
    local cmd=("$SSAM" compare "$@" "${DATA[@]}" --output "$folder")
    local start=$SECONDS rc=0
    { echo "== $(date -u +%FT%TZ) ${cmd[*]}"; machine; } | tee -a "$folder/parts.log"
    "${cmd[@]}" || rc=$?
    echo "== exit $rc after $((SECONDS - start)) s" | tee -a "$folder/parts.log"
    return $rc
}

# seeds: --seeds SEED, when a seed was given (the CPU parts), else the recipe's three.
seeds() { if [[ -n $SEED ]]; then need_seed; echo --seeds "$SEED,"; fi; }

# copy FROM TO: the small files of every finished run (summary.json says finished), plus each folder's own files.
copy_finished() {
    local from=$1 to=$2 f run
    need_ssam
    for f in $FOLDERS; do
        [[ -d $from/$f ]] || continue
        mkdir -p "$to/$f"
        # the folder's log, tables and plots (rebuilt by `report` from the runs, kept so that the page's links work)
        for table in "$from/$f"/*.{log,yaml,md,csv,png}; do
            [[ -f $table ]] && cp "$table" "$to/$f/"
        done
        # Every finished run's small files, listed by one Python call per folder: the run is the file's folder.
        mapfile -t run < <(runfolder finished "$from/$f"/runs/*/)
        (( ${#run[@]} )) || continue
        while IFS= read -r file; do
            mkdir -p "$to/$f/runs/$(basename "$(dirname "$file")")"
            cp "$file" "$to/$f/runs/$(basename "$(dirname "$file")")/"
        done < <(runfolder archive-files "${run[@]}")
    done
}

# share_grid NOISE FOLDER: a sweep's SGD run and its SAM run at the recipe's rho have the grid's settings, so the
# grid's finished runs of the chosen seed(s) are copied in instead of retrained (compare checks that the settings
# agree and refuses a run folder that does not), with a note in parts.log. The SAM run's rho, for its name in the
# sweep, is read from its own config.yaml, so that the recipe stays the one place that sets it.
share_grid() {
    local noise=$1 folder=$OUT/$2 seeds=${SEED:-*} run seed name from rho
    while IFS= read -r from; do
        run=$(basename "$from"); seed=${run##*_seed}
        if [[ $run == sgd_* ]]; then
            name=sgd_seed$seed
        else
            rho=$(sed -n 's/^rho: *//p' "$from/config.yaml")
            name=sam_rho${rho}_seed$seed
        fi
        [[ -e $folder/runs/$name ]] && continue
        mkdir -p "$folder/runs"
        cp -rp "$from" "$folder/runs/$name"  # -p: the kept mtime keeps the Hessian cache valid
        echo "== $(date -u +%FT%TZ) note: runs/$name copied from fashion_cpu/runs/$run (same settings), not retrained" \
            | tee -a "$folder/parts.log"
    done < <(runfolder finished "$OUT"/fashion_cpu/runs/{sgd,sam}_noise"$noise"_seed$seeds)
}

# share_mem: the rho sweep's SAM and SSAM-F runs at the recipe's rho are the memorization grid's runs (same
# settings, checked by compare); copied in instead of retrained, with a note in parts.log.
share_mem() {
    local folder=$OUT/fashion_mem_rho seeds=${SEED:-*} from run seed rho name
    while IFS= read -r from; do
        run=$(basename "$from"); seed=${run##*_seed}
        rho=$(sed -n 's/^rho: *//p' "$from/config.yaml")
        name=${run%%_seed*}_rho${rho}_seed$seed
        [[ -e $folder/runs/$name ]] && continue
        mkdir -p "$folder/runs"
        cp -rp "$from" "$folder/runs/$name"
        echo "== $(date -u +%FT%TZ) note: runs/$name copied from fashion_mem/runs/$run (same settings), not retrained" \
            | tee -a "$folder/parts.log"
    done < <(runfolder finished "$OUT"/fashion_mem/runs/{sam,ssamf}_seed$seeds)
}

# one_of WHAT VALUE ALLOWED...: a part's argument, one of the values fixed for it (else one line, exit 2).
one_of() {
    local what=$1 value=$2 a; shift 2
    for a; do [[ $value == "$a" ]] && return 0; done
    local allowed="$*"
    echo "results_fashion.sh $PART: got $what '$value'; allowed: ${allowed// / or }" >&2; exit 2
}
radius() { one_of rho "$@"; }

need_seed() { [[ $SEED =~ ^[0-9]+$ ]] || { echo "results_fashion.sh $PART: give a seed, e.g. 1234" >&2; exit 2; }; }

case $PART in
    cpu)       part fashion_cpu --config $CPU $(seeds) ;;
    cpu-rho)   share_grid 0 fashion_cpu_rho
               part fashion_cpu_rho --config $CPU $(seeds) --opts sgd,sam --rho $RHOS --label_noise 0 ;;
    cpu-noise-rho)
               share_grid 0.4 fashion_cpu_noise_rho
               part fashion_cpu_noise_rho --config $CPU $(seeds) --opts sgd,sam --rho $NOISE_RHOS --label_noise 0.4 ;;
    mem)       part fashion_mem --config $MEM $(seeds) ;;
    mem-clean) part fashion_mem_clean --config $MEM $(seeds) --label_noise 0 --rho 0.05 ;;
    mem-rho)   share_mem
               part fashion_mem_rho --config $MEM $(seeds) --opts sam,ssamf --rho $MEM_RHOS ;;
    mem-full)  part fashion_mem_full --config $MEM $(seeds) "${MEM_FULL[@]}" ;;
    mem-m)     part fashion_mem_m --config $MEM $(seeds) --opts sam --sweep sam_micro_batch=32,8,1 ;;
    mem-m-ssamf)
               M=${2:?mem-m-ssamf: give the micro-batch size, e.g. 1}; SEED=${3:-}
               part fashion_mem_m_ssamf --config $MEM $(seeds) --opts ssamf --sam_micro_batch "$M" ;;
    mem-full-sched) part fashion_mem_full_sched --config $MEM $(seeds) "${MEM_FULL[@]}" --opts sam --sam_schedule looksam:2 ;;
    # After mem-rho showed sparse SAM at rho 0.3 where SAM is at 0.2 (settings fixed before these seeds ran): SSAM-D's
    # missing rho sweep, and the headline at rho 0.3 for SAM and both sparse optimizers.
    mem-rho-ssamd) part fashion_mem_rho_ssamd --config $MEM $(seeds) --opts ssamd --rho 0.05,0.1,0.3 ;;
    mem-full-rho) part fashion_mem_full_rho --config $MEM $(seeds) "${MEM_FULL[@]}" --opts sam,ssamf,ssamd --rho 0.3 ;;
    # After mem-full-rho found rho 0.2 short for SAM too on the full set: two larger radii, one folder each (so that
    # the two can run side by side, one per core); each optimizer's rho is then chosen by its final validation accuracy.
    mem-full-rho-wide)
               R=${2:-}; SEED=${3:-}; radius "$R" 0.4 0.5
               part fashion_mem_full_rho$R --config $MEM $(seeds) "${MEM_FULL[@]}" --opts sam,ssamf,ssamd --rho "$R" ;;
    # After mem-full-rho-wide: SSAM-D's validation chose 0.5, the largest radius run; two beyond it, same rule.
    mem-full-rho-ssamd)
               R=${2:-}; SEED=${3:-}; radius "$R" 0.6 0.7
               part fashion_mem_full_rho$R --config $MEM $(seeds) "${MEM_FULL[@]}" --opts ssamd --rho "$R" ;;
    # The CNN's grid (its recipe fixes the rho grid and the reading rule) and the MLP's noise-rate curve: each rate's
    # rho chosen per optimizer by mean final validation accuracy from the 40% sweep's grid (fixed before these ran).
    cheap)     D=${2:-}; SEED=${3:-}; RHOS_D=$(cheap_rhos "$D")
               part "fashion_mem_cheap_${D/:/-}" --config $MEM $(seeds) --opts sam --rho "$RHOS_D" --sam_ascent "$D" ;;
    # After cheap (each direction's radius chosen on validation): the chosen direction with sparse masks, on clean
    # labels and on the headline, and on the CNN; the direction and radius are arguments, checked against the grids.
    # After cheap: a direction whose validation chose its grid's largest radius, at two radii beyond it.
    cheap-wide) D=${2:-}; R=${3:-}; SEED=${4:-}
               cheap_rhos "$D" >/dev/null; radius "$R" $(wide_rhos "$D")
               part "fashion_mem_cheap_${D/:/-}_rho$R" --config $MEM $(seeds) --opts sam --rho "$R" --sam_ascent "$D" ;;
    # SAF and MESA: the trajectory losses with plain SGD, each lambda grid fixed here (SAF's paper uses 0.3, MESA's
    # 0.8). MESA's paper decay 0.9998 is a 5,000-step time constant, twice this run's 2,340 steps; 0.999 (1,000 steps,
    # about 13 epochs) keeps the teacher a few epochs behind, as SAF's lag does. Chosen by pick_rho.py --setting.
    saf)       part fashion_mem_saf --config $MEM $(seeds) --opts sgd --sweep saf=0.1,0.3,1 ;;
    mesa)      part fashion_mem_mesa --config $MEM $(seeds) --opts sgd --sweep mesa=0.3,0.8,2 --mesa_decay 0.999 ;;
    # After saf (or mesa) chose its grid's largest lambda: two beyond it, one folder each, the same rule.
    # (3 and 10 first; 10 was the largest again and chosen, so 30 and 100 followed, by the same rule.)
    saf-wide)  L=${2:-}; SEED=${3:-}; one_of lambda "$L" 3 10 30 100
               part fashion_mem_saf_l$L --config $MEM $(seeds) --opts sgd --sweep saf=$L ;;
    mesa-wide) L=${2:-}; SEED=${3:-}; one_of lambda "$L" 5 10
               part fashion_mem_mesa_l$L --config $MEM $(seeds) --opts sgd --sweep mesa=$L --mesa_decay 0.999 ;;
    cheap-sparse) D=${2:-}; SEED=${3:-}; RHOS_D=$(cheap_rhos "$D")
               part "fashion_mem_cheap_sparse_${D/:/-}" --config $MEM $(seeds) --opts ssamf,ssamd --rho "$RHOS_D" \
                   --sam_ascent "$D" ;;
    cheap-clean|cheap-full)
               D=${2:-}; R=${3:-}; SEED=${4:-}; RHOS_D=$(cheap_rhos "$D"); radius "$R" ${RHOS_D//,/ } $(wide_rhos "$D")
               if [[ $PART == cheap-clean ]]; then EXTRA=(--label_noise 0); else EXTRA=("${MEM_FULL[@]}"); fi
               part "fashion_mem_${PART//-/_}_${D/:/-}" --config $MEM $(seeds) --opts sam --rho "$R" --sam_ascent "$D" \
                   "${EXTRA[@]}" ;;
    cnn-cheap) D=${2:-}; SEED=${3:-}; RHOS_D=$(cheap_rhos "$D")
               part "fashion_cnn_cheap_${D/:/-}" --config $CNN $(seeds) --opts sam --rho "$RHOS_D" --sam_ascent "$D" ;;
    cnn-more)  RS=${2:-}; RF=${3:-}; SEED=${4:-}; radius "$RS" 0.1 0.2 0.4; radius "$RF" 0.1 0.2 0.4
               part fashion_cnn_more --config $CNN $(seeds) --opts ssamf --rho "$RF" \
                   --sweep granularity=channel,2:4 --skip_dead
               part fashion_cnn_looksam --config $CNN $(seeds) --opts sam --rho "$RS" --sam_schedule looksam:2
               part fashion_cnn_bnfrozen --config $CNN $(seeds) --opts sam --rho "$RS" --freeze_bn_second_pass ;;
    cnn)       part fashion_cnn --config $CNN $(seeds) ;;
    noise)     R=${2:-}; SEED=${3:-}; one_of "noise rate" "$R" 0 0.2 0.6
               part fashion_mem_noise$R --config $MEM $(seeds) --opts sgd,sam,ssamf --rho $NOISE_CURVE_RHOS --label_noise "$R" ;;
    mem-m1-rho) part fashion_mem_m1_rho --config $MEM $(seeds) --opts sam --sam_micro_batch 1 --rho 0.01,0.02,0.05 ;;
    mem-sched) part fashion_mem_sched --config $MEM $(seeds) --opts sgd,sam,ssamf --sweep sam_schedule=$MEM_SCHEDULES ;;
    mem-sched-clean)
               part fashion_mem_sched_clean --config $MEM $(seeds) --opts sgd,sam,ssamf --label_noise 0 --rho 0.05 \
                   --sweep sam_schedule=$MEM_SCHEDULES ;;
    archive)   copy_finished "$OUT" "$ARCHIVE"; echo "results_fashion.sh: finished runs copied to $ARCHIVE" ;;
    restore)   copy_finished "$ARCHIVE" "$OUT"; echo "results_fashion.sh: finished runs restored into $OUT" ;;
    gpu)       need_seed; part fashion_gpu --config $GPU --seeds "$SEED," ;;
    gpu-noise) need_seed; part fashion_gpu_noise40 --config $GPU --seeds "$SEED," --label_noise 0.4 ;;
    gpu-rho)   need_seed; part fashion_gpu_rho --config $GPU --seeds "$SEED," --opts sgd,sam --rho $RHOS ;;
    report)
        # --report_only over the seeds each folder is meant to hold; unfinished runs are listed as such.
        [[ -d $OUT/fashion_cpu ]] && part fashion_cpu --config $CPU --report_only
        [[ -d $OUT/fashion_cpu_rho ]] && part fashion_cpu_rho --config $CPU --opts sgd,sam --rho $RHOS \
            --label_noise 0 --report_only
        [[ -d $OUT/fashion_cpu_noise_rho ]] && part fashion_cpu_noise_rho --config $CPU --opts sgd,sam \
            --rho $NOISE_RHOS --label_noise 0.4 --report_only
        [[ -d $OUT/fashion_mem ]] && part fashion_mem --config $MEM --report_only
        [[ -d $OUT/fashion_cnn ]] && part fashion_cnn --config $CNN --report_only
        for R in 0 0.2 0.6; do
            [[ -d $OUT/fashion_mem_noise$R ]] && part fashion_mem_noise$R --config $MEM --opts sgd,sam,ssamf --rho $NOISE_CURVE_RHOS \
                --label_noise $R --report_only
        done
        [[ -d $OUT/fashion_mem_clean ]] && part fashion_mem_clean --config $MEM --label_noise 0 --rho 0.05 --report_only
        [[ -d $OUT/fashion_mem_rho ]] && part fashion_mem_rho --config $MEM --opts sam,ssamf --rho $MEM_RHOS --report_only
        [[ -d $OUT/fashion_mem_full ]] && part fashion_mem_full --config $MEM "${MEM_FULL[@]}" --report_only
        [[ -d $OUT/fashion_mem_m ]] && part fashion_mem_m --config $MEM --opts sam --sweep sam_micro_batch=32,8,1 \
            --report_only
        [[ -d $OUT/fashion_mem_sched ]] && part fashion_mem_sched --config $MEM --opts sgd,sam,ssamf \
            --sweep sam_schedule=$MEM_SCHEDULES --report_only
        [[ -d $OUT/fashion_mem_sched_clean ]] && part fashion_mem_sched_clean --config $MEM --opts sgd,sam,ssamf \
            --label_noise 0 --rho 0.05 --sweep sam_schedule=$MEM_SCHEDULES --report_only
        [[ -d $OUT/fashion_gpu ]] && part fashion_gpu --config $GPU --report_only
        [[ -d $OUT/fashion_gpu_noise40 ]] && part fashion_gpu_noise40 --config $GPU --label_noise 0.4 --report_only
        [[ -d $OUT/fashion_gpu_rho ]] && part fashion_gpu_rho --config $GPU --opts sgd,sam --rho $RHOS --report_only
        true ;;
    *) echo "results_fashion.sh: unknown part '$PART'; allowed: cpu, cpu-rho, cpu-noise-rho, mem, mem-clean, mem-rho, mem-full, mem-sched, mem-sched-clean, mem-m, mem-m-ssamf, mem-m1-rho, mem-full-sched, mem-rho-ssamd, mem-full-rho, mem-full-rho-wide, mem-full-rho-ssamd, cheap, cheap-wide, saf, mesa, saf-wide, mesa-wide, cheap-sparse, cheap-clean, cheap-full, cnn, cnn-cheap, cnn-more, noise, gpu, gpu-noise, gpu-rho, report, archive, restore" >&2
       exit 2 ;;
esac
