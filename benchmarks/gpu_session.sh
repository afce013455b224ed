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
#   4. a short training run on the model-ready images of step 3 (whole-volume autoencoder then stage 2,
#      bf16 autocast) for seconds per step on the GPU: how long a converged model would take (issue 4).
# OUT gets at most 8 files (the device tool's limit): speed.json/.md, participant.json/.md, train.jsonl,
# gpu_tests.log, and run.log with the console output of every step.
set -u
HERE=$(cd "$(dirname "$0")/.." && pwd)
cd "$HERE"
N_KIT=${N_KIT:-6}              # distinct IXI subjects carried (about 0.65 MB each; the carry limit is tight)
N_SUBJECTS=${N_SUBJECTS:-32}   # subjects of the GPU participant run (copies of the carried ones)
BATCH=${BATCH:-16}
DEVICE=${DEVICE:-cuda}
GRIDS=${GRIDS:-compact paper}  # bench_speed grids
AE_STEPS=${AE_STEPS:-150} LDAE_STEPS=${LDAE_STEPS:-300} NPROCS=${NPROCS:-16}
# a dry run of `run` on a CPU machine, in this checkout's environment:
#   DEVICE=cpu SKIP_INSTALL=1 GRIDS=tiny N_SUBJECTS=10 BATCH=2 AE_STEPS=2 LDAE_STEPS=2 NPROCS=1 \
#   bash benchmarks/gpu_session.sh run /tmp/gpu-dry

travelling_bytes() {
    local files
    files=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)
    echo $((files + $(du -sb .whl | cut -f1) + $(du -sb .kit | cut -f1)))
}

kit() {
    local py=${PYTHON:-python3} plat=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
             manylinux2014_x86_64 manylinux1_x86_64; do plat+=(--platform "$p"); done
    rm -rf .whl .kit && mkdir -p .whl .kit
    # what the device image lacks (it has torch, numpy, scipy, pandas, scikit-learn, matplotlib, safetensors, typer,
    # rich, einops, formulaic, requests, tqdm): the versions this checkout's environment runs
    local pkgs=(monai nibabel pybids bids-validator bidsschematools templateflow acres deepbet connected-components-3d
                fill_voids customtkinter darkdetect num2words frozendict universal_pathlib SQLAlchemy tomli_w
                importlib_resources platformdirs)
    local pinned=()
    for p in "${pkgs[@]}"; do
        v=$("$py" -m pip show "$p" 2>/dev/null | sed -n 's/^Version: //p')
        [ -n "$v" ] || { echo "gpu_session kit: $p is not installed here; install the project first" >&2; exit 66; }
        pinned+=("$p==$v")
    done
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
        -d .whl "${pinned[@]}" || exit 1
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
    local limit=$((64 * 1024 * 1024 - 512 * 1024)) total last
    total=$(travelling_bytes)
    while [ "$total" -gt "$limit" ] && [ "$(tail -n +2 .kit/ixi/participants.tsv | wc -l)" -gt 2 ]; do
        last=$(tail -n 1 .kit/ixi/participants.tsv | cut -f1)
        rm -rf ".kit/ixi/$last" && sed -i '$d' .kit/ixi/participants.tsv
        echo "kit: $total bytes would travel; dropped $last"
        total=$(travelling_bytes)
    done
    [ "$total" -le "$limit" ] || { echo "gpu_session kit: $total bytes would travel, over the limit" >&2; exit 1; }
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
    echo "== 4. training speed $(date +%T)"
    rm -rf /tmp/train
    timeout 90 python3 -m ldae_bids.cli.train /tmp/bp/out -o /tmp/train --device "$DEVICE" --ae-patch-size 0 --ae-steps "$AE_STEPS" \
        --ldae-steps "$LDAE_STEPS" --ae-batch-size 4 --ldae-batch-size 16 --val-every 1000 --checkpoint-every 1000
    echo "training exit $?"
    cp /tmp/train/logs/train.jsonl "$out/" 2>/dev/null
    echo "== done $(date +%T)"
}

case "${1:-}" in
    kit) kit ;;
    run) shift; run "$@" ;;
    *) echo "usage: $0 kit | run OUT" >&2; exit 64 ;;
esac
