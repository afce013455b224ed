#!/usr/bin/env bash
# The GPU figures of issues 4 and 7 in one short run, for a session that is lent a GPU machine whose Python has
# torch but not this project's other dependencies (the workplace's device machine; see docs/performance.md).
#
#   bash benchmarks/gpu_session.sh kit       # here, with network: wheels -> .whl/, data -> .kit/ (both git-ignored)
#   bash benchmarks/gpu_session.sh run OUT   # there (carry .whl and .kit): install, then measure into OUT
#
# `run` installs the wheels and the project into /tmp/site, then, each bounded by a timeout so that the whole
# stays under about 9 minutes on one H100/H200:
#   1. the GPU tests (pytest -m gpu);
#   2. bench_speed.py --device cuda, compact and paper grids (LDAE vs image-space ratio, largest batch);
#   3. bench_participant.py --device cuda on N_SUBJECTS copies of the kit's IXI subjects, batched
#      (preprocess + embed + reconstruct + manipulate + fill, s/subject, peak GPU memory);
#   3b. bench_memory_format.py --device cuda on 8 of those images: contiguous against channels-last weights
#      (the app keeps contiguous on CUDA until this says otherwise; its Markdown: --render memory_format.json);
#   3c. embed + reconstruct again with --stage-option embed.refine_latent=30 (the refinement's cost on the GPU;
#      its per-stage resources table is printed to run.log);
#   4. a short training run on the model-ready images of step 3 (whole-volume autoencoder then stage 2,
#      bf16 autocast) for seconds per step on the GPU: how long a converged model would take (issue 4).
# OUT gets at most 8 files (the device tool's limit): speed.json/.md, participant.json/.md, memory_format.json,
# train.jsonl, gpu_tests.log, and run.log with the console output of every step.
#
#   TRAIN_DATA=DIR bash benchmarks/gpu_session.sh trainkit   # here: training wheels + all 134 images -> .trainkit/
#   bash benchmarks/gpu_session.sh train OUT                  # there (carry .trainkit): train, bundle -> OUT
#
# `train` trains the shipped default further (issues 4 and 5): see the training section at the end. Each mode
# takes one device call of under 10 minutes; a session lent 15 minutes of device time does one of them (`train`
# first: the model is what the product lacks most).
set -u
HERE=$(cd "$(dirname "$0")/.." && pwd)
cd "$HERE" || exit 1
N_KIT=${N_KIT:-6}              # distinct IXI subjects carried (about 0.65 MB each; the carry limit is tight)
N_SUBJECTS=${N_SUBJECTS:-32}   # subjects of the GPU participant run (copies of the carried ones)
BATCH=${BATCH:-16}
DEVICE=${DEVICE:-cuda}
GRIDS=${GRIDS:-compact paper}  # bench_speed grids
AE_STEPS=${AE_STEPS:-150} LDAE_STEPS=${LDAE_STEPS:-300} NPROCS=${NPROCS:-16}
# a dry run of `run` on a CPU machine, in this checkout's environment:
#   DEVICE=cpu SKIP_INSTALL=1 GRIDS=tiny N_SUBJECTS=10 BATCH=2 AE_STEPS=2 LDAE_STEPS=2 NPROCS=1 \
#   bash benchmarks/gpu_session.sh run /tmp/gpu-dry

TRAVEL_LIMIT=$((64 * 1024 * 1024 - 512 * 1024))  # the device tool's 64 MiB, with half a MiB to spare

travelling_bytes() {  # the repository's files that travel, plus the carried folders given as arguments
    local files total d
    files=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)
    total=$files
    for d in "$@"; do total=$((total + $(du -sb "$d" | cut -f1))); done
    echo "$total"
}

download_wheels() {  # download_wheels DIR PACKAGE...: Python 3.12 wheels of the versions this environment runs
    local dir=$1 py=${PYTHON:-python3} plat=() pinned=() p v
    shift
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
             manylinux2014_x86_64 manylinux1_x86_64; do plat+=(--platform "$p"); done
    for p in "$@"; do
        v=$("$py" -m pip show "$p" 2>/dev/null | sed -n 's/^Version: //p')
        [ -n "$v" ] || { echo "gpu_session: $p is not installed here; install the project first" >&2; exit 66; }
        pinned+=("$p==$v")
    done
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
        -d "$dir" "${pinned[@]}" || exit 1
}

kit() {
    local py=${PYTHON:-python3}
    rm -rf .whl .kit && mkdir -p .whl .kit
    # what the device image lacks (it has torch, numpy, scipy, pandas, scikit-learn, matplotlib, safetensors, typer,
    # rich, einops, formulaic, requests, tqdm): the versions this checkout's environment runs
    download_wheels .whl monai nibabel pybids bids-validator bidsschematools templateflow acres deepbet \
        connected-components-3d fill_voids customtkinter darkdetect num2words frozendict universal_pathlib SQLAlchemy \
        tomli_w importlib_resources platformdirs
    # docopt (needed by num2words) has no wheel on PyPI: build its pure-Python one
    "$py" -m pip wheel -q --no-deps -w .whl "docopt==$("$py" -m pip show docopt | sed -n 's/^Version: //p')" || exit 1
    local ixi="$HERE/../shared/data/ixi"
    [ -f "$ixi/participants.tsv" ] || { echo "gpu_session kit: $ixi: no IXI dataset" >&2; exit 66; }
    mkdir -p .kit/ixi
    cp "$ixi/dataset_description.json" "$ixi/participants.json" .kit/ixi/
    head -n $((N_KIT + 1)) "$ixi/participants.tsv" > .kit/ixi/participants.tsv
    for s in $(tail -n +2 .kit/ixi/participants.tsv | cut -f1); do cp -r "$ixi/$s" .kit/ixi/; done
    cp -r "$HERE/../shared/templateflow" .kit/templateflow
    # what travels (tracked and untracked-not-ignored files + the two carried folders) must stay under 64 MiB:
    # drop carried subjects (at least 2 stay) until it fits with half a MiB to spare
    local total last
    total=$(travelling_bytes .whl .kit)
    while [ "$total" -gt "$TRAVEL_LIMIT" ] && [ "$(tail -n +2 .kit/ixi/participants.tsv | wc -l)" -gt 2 ]; do
        last=$(tail -n 1 .kit/ixi/participants.tsv | cut -f1)
        rm -rf ".kit/ixi/$last" && sed -i '$d' .kit/ixi/participants.tsv
        echo "kit: $total bytes would travel; dropped $last"
        total=$(travelling_bytes .whl .kit)
    done
    [ "$total" -le "$TRAVEL_LIMIT" ] || { echo "gpu_session kit: $total bytes would travel, over the limit" >&2; exit 1; }
    echo "kit: $total bytes travel ($(tail -n +2 .kit/ixi/participants.tsv | wc -l) subjects); $(du -sh .whl | cut -f1) wheels, $(du -sh .kit | cut -f1) data; tracked files $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes (all must stay under 64 MiB)"
}

run() {
    local out=${1:?usage: gpu_session.sh run OUT}
    mkdir -p "$out"
    exec > >(tee "$out/run.log") 2>&1
    export PYTHONUNBUFFERED=1
    if [ -z "${SKIP_INSTALL:-}" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || { echo "wheel install failed"; exit 1; }
        python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . \
            || { echo "project install failed"; exit 1; }
        export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
    fi
    rm -rf /tmp/tfhome && cp -r .kit/templateflow /tmp/tfhome && export TEMPLATEFLOW_HOME=/tmp/tfhome
    nvidia-smi -L 2>/dev/null
    python3 -c "import torch, monai; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'monai', monai.__version__)"
    local bundle=ldae_bids/data/models/ldae-compact-ixi
    echo "== 1. GPU tests $(date +%T)"
    timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests > "$out/gpu_tests.log" 2>&1
    echo "gpu tests exit $?"; tail -3 "$out/gpu_tests.log"
    echo "== 2. bench_speed $(date +%T)"
    timeout 120 python3 benchmarks/bench_speed.py --device "$DEVICE" --grids $GRIDS --repeats 5 --check-steps 2 \
        --check-grids $GRIDS --bundle "$bundle" --out "$out"
    echo "bench_speed exit $?"
    echo "== 3. bench_participant $(date +%T)"
    local bids=/tmp/ixi-gpu i=0
    rm -rf "$bids" && mkdir -p "$bids" && cp .kit/ixi/dataset_description.json .kit/ixi/participants.json "$bids"/
    head -1 .kit/ixi/participants.tsv > "$bids/participants.tsv"
    local rows=() ; mapfile -t rows < <(tail -n +2 .kit/ixi/participants.tsv)
    while [ "$i" -lt "$N_SUBJECTS" ]; do
        local row=${rows[$((i % ${#rows[@]}))]} src label
        src=${row%%$'\t'*}; label=$(printf "sub-GPU%03d" "$i")
        mkdir -p "$bids/$label/anat"
        cp "$PWD/.kit/ixi/$src/anat/${src}_T1w.nii.gz" "$bids/$label/anat/${label}_T1w.nii.gz"
        printf "%s\t%s\n" "$label" "${row#*$'\t'}" >> "$bids/participants.tsv"
        i=$((i + 1))
    done
    timeout 200 python3 benchmarks/bench_participant.py --bids "$bids" --model "$bundle" --device "$DEVICE" \
        --n-subjects "$N_SUBJECTS" --batch-size "$BATCH" --ddim-steps 20 --nprocs "$NPROCS" --work /tmp/bp --out "$out"
    echo "bench_participant exit $?"
    echo "== 3b. weight layout $(date +%T)"
    timeout 45 python3 benchmarks/bench_memory_format.py --data /tmp/bp/out --any-images --limit 8 --batch 1 "$BATCH" \
        --batch-size 8 --repeats 3 --precisions bf16 fp32 --device "$DEVICE" --out /tmp/mf
    echo "bench_memory_format exit $?"
    cp /tmp/mf/memory_format.json "$out/" 2>/dev/null
    echo "== 3c. latent refinement $(date +%T)"
    # embed (and reconstruct) again on step 3's outputs with embed.refine_latent=30: what refinement costs per
    # subject on the GPU (the resources table goes to run.log; the option changes their resume keys, so both rerun)
    timeout 50 python3 -m ldae_bids "$bids" /tmp/bp/out participant --stages embed reconstruct --model "$bundle" \
        --device "$DEVICE" --batch-size "$BATCH" --ddim-steps 20 --nprocs "$NPROCS" --skip-bids-validation \
        --stage-option embed.refine_latent=30 > /tmp/refine.log 2>&1
    echo "refinement run exit $?"; tail -3 /tmp/refine.log
    cat "$(ls -t /tmp/bp/out/logs/resources-*.tsv | head -1)"
    echo "== 4. training speed $(date +%T)"
    rm -rf /tmp/train
    timeout 75 python3 -m ldae_bids.cli.train /tmp/bp/out -o /tmp/train --device "$DEVICE" --ae-patch-size 0 --ae-steps "$AE_STEPS" \
        --ldae-steps "$LDAE_STEPS" --ae-batch-size 4 --ldae-batch-size 16 --val-every 1000 --checkpoint-every 1000
    echo "training exit $?"
    cp /tmp/train/logs/train.jsonl "$out/" 2>/dev/null
    echo "== done $(date +%T)"
}

# ---------------------------------------------------------------------------------------------------- training
# The shipped default trained further on the GPU, in one device call of under 10 minutes:
#   TRAIN_DATA=/work/cache/ixi-preproc bash benchmarks/gpu_session.sh trainkit   # here: .trainkit/ (git-ignored)
#   bash benchmarks/gpu_session.sh train OUT                                      # there, carrying .trainkit
# (device run: command "bash benchmarks/gpu_session.sh train $OUT", carry [".trainkit"], timeout_s 600)
# A CPU dry run of the plumbing: DEVICE=cpu SKIP_INSTALL=1 CALL_LIMIT=100000 AE_MIN=1.2 LDAE_MIN=1 AE_BATCH=1 \
#   LDAE_BATCH=2 VAL_EVERY=40 CKPT_EVERY=40 TRAIN_WORK=/tmp/dry bash benchmarks/gpu_session.sh train /tmp/dry-out
# then here: cat OUT/result.tgz.part-* | tar xz -C DIR; benchmark DIR/bundle; ship it only if it is better.
AE_MIN=${AE_MIN:-3} LDAE_MIN=${LDAE_MIN:-3.5}       # wall-clock budgets of the two stages (minutes): with loading,
# validations, the export and the report they must fit the ~520 s the call leaves the training
AE_BATCH=${AE_BATCH:-4} LDAE_BATCH=${LDAE_BATCH:-8}
AE_LR=${AE_LR:-5e-5} LDAE_LR=${LDAE_LR:-2e-4} AE_SSIM=${AE_SSIM:-0.5}   # AE_LR 5e-5: the paper's; 1e-4 made the
# SSIM term diverge for a while in the CPU decoder refinement (docs/model.md)
VAL_EVERY=${VAL_EVERY:-1000} CKPT_EVERY=${CKPT_EVERY:-500}
INIT_FROM=${INIT_FROM:-ldae_bids/data/models/ldae-compact-ixi}
# AE_MODE finetune: the whole autoencoder trained further (then new latents, and stage 2 adapts to them);
# decoder: its encoder kept (latents and stage 2 stay valid), the decoder refined for AE_MIN after stage 2
AE_MODE=${AE_MODE:-finetune}

trainkit() {
    local data=${TRAIN_DATA:?set TRAIN_DATA to the model-ready images (bench_preprocess.py --save-dir)}
    rm -rf .trainkit && mkdir -p .trainkit/whl
    grep -qx '/.trainkit/' .git/info/exclude 2>/dev/null || grep -qx '/.trainkit/' .gitignore \
        || { echo "gpu_session trainkit: /.trainkit/ must be git-ignored" >&2; exit 1; }
    # what training needs that the device image lacks (it has torch, numpy, scipy, matplotlib, safetensors, typer,
    # rich, einops); the project itself travels as source (PYTHONPATH), not as a wheel
    download_wheels .trainkit/whl monai nibabel tomli_w
    ${PYTHON:-python3} benchmarks/train_kit.py pack --data "$data" --out .trainkit/data || exit 1
    local total
    total=$(travelling_bytes .trainkit)
    [ "$total" -le "$TRAVEL_LIMIT" ] || { echo "gpu_session trainkit: $total bytes would travel, over the 64 MiB limit" >&2; exit 1; }
    echo "trainkit: $total bytes travel (limit $TRAVEL_LIMIT): $(du -sh .trainkit/whl | cut -f1) wheels, $(du -sh .trainkit/data | cut -f1) images"
}

train() {
    local out=${1:?usage: gpu_session.sh train OUT} work=${TRAIN_WORK:-/tmp/ldae-train}
    mkdir -p "$out"
    exec > >(tee "$out/train.log") 2>&1
    export PYTHONUNBUFFERED=1
    if [ -z "${SKIP_INSTALL:-}" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .trainkit/whl/*.whl || { echo "wheel install failed"; exit 1; }
        export PYTHONPATH=/tmp/site:$HERE
    fi
    nvidia-smi -L 2>/dev/null
    python3 -c "import torch, monai; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'monai', monai.__version__)"
    rm -rf "$work" && mkdir -p "$work"
    python3 benchmarks/train_kit.py unpack --kit .trainkit/data --out "$work/images" || exit 1
    # the device tool ends a call at 600 s and brings back only what is in OUT by then: training gets what is left of
    # CALL_LIMIT after the install and the unpacking, less a minute for the fallback export and the packing
    local limit
    limit=$(( ${CALL_LIMIT:-585} - SECONDS - 60 ))
    echo "== training $(date +%T): autoencoder ($AE_MODE) ${AE_MIN} min, stage 2 ${LDAE_MIN} min, killed after ${limit} s"
    python3 -c "import sys; sys.exit(($AE_MIN + $LDAE_MIN) * 60 + 45 > $limit)" \
        || echo "warning: AE_MIN + LDAE_MIN leave too little of the ${limit} s for loading, export and the report"
    local stage1=(--ae-steps 1000000 --ae-max-minutes "$AE_MIN" --ae-batch-size "$AE_BATCH" --ae-lr "$AE_LR"
                  --ae-ssim-weight "$AE_SSIM" --decoder-steps 0)
    local stage2=(--ldae-steps 1000000 --ldae-max-minutes "$LDAE_MIN")
    case "$AE_MODE" in
        finetune) ;;
        decoder) stage1=(--ae-steps 0 --decoder-steps 1000000 --decoder-max-minutes "$AE_MIN"
                         --decoder-batch-size "$AE_BATCH" --decoder-lr "$AE_LR" --decoder-ssim-weight "$AE_SSIM") ;;
        *) echo "AE_MODE must be finetune or decoder"; exit 64 ;;
    esac
    # a budget of 0 means none to the training CLI: a phase given 0 minutes gets 0 steps instead
    no_minutes() { python3 -c "import sys; sys.exit(float('$1') > 0)"; }
    if no_minutes "$AE_MIN"; then stage1=(--ae-steps 0 --decoder-steps 0); fi
    if no_minutes "$LDAE_MIN"; then stage2=(--ldae-steps 0); fi
    timeout "$limit" python3 -m ldae_bids.cli.train "$work/images" -o "$work/run" --device "$DEVICE" \
        --init-from "$INIT_FROM" --ae-patch-size 0 "${stage1[@]}" \
        "${stage2[@]}" --ldae-batch-size "$LDAE_BATCH" --ldae-lr "$LDAE_LR" \
        --ldae-weight-cap 20 --lr-schedule cosine --lr-min-fraction 0.05 --steps-from-budget \
        --val-every "$VAL_EVERY" --checkpoint-every "$CKPT_EVERY" --bundle-name ldae-compact-ixi \
        --licence CC-BY-SA-3.0 --data-description "IXI (brain-development.org/ixi-dataset, CC BY-SA 3.0): 134 healthy \
adults, 2 mm T1w, preprocessed by ldae-bids (deepbet, affine to MNI152NLin2009cAsym, 2 mm grid 80x96x80, percentile \
scaling), 8-bit quantised for transfer (benchmarks/train_kit.py)"
    echo "training exit $? $(date +%T)"
    if [ ! -f "$work/run/bundle/model.safetensors" ] && [ -f "$work/run/state.json" ]; then
        echo "no bundle: exporting the last checkpoint"
        timeout 40 python3 -m ldae_bids.cli.train "$work/images" -o "$work/run" --export-only
    fi
    local keep=()
    for f in bundle report logs settings.json state.json split.json; do [ -e "$work/run/$f" ] && keep+=("$f"); done
    [ "${#keep[@]}" -gt 0 ] || { echo "nothing to bring back"; exit 1; }
    # files come back at most 16 MiB each: the result travels as parts (cat result.tgz.part-* | tar xz)
    tar czf "$work/result.tgz" -C "$work/run" "${keep[@]}" && split -b 15M -d "$work/result.tgz" "$out/result.tgz.part-"
    ls -la "$out"
    echo "== done $(date +%T)"
}

case "${1:-}" in
    kit) kit ;;
    run) shift; run "$@" ;;
    trainkit) trainkit ;;
    train) shift; train "$@" ;;
    *) echo "usage: $0 kit | run OUT | trainkit | train OUT" >&2; exit 64 ;;
esac
