#!/bin/bash
# Submit a whole ldae-bids analysis to Slurm: one participant task per subject (an array), then the
# group level once they have all succeeded.
#
#   containers/slurm/submit.sh [submit options] SIF BIDS_DIR OUT_DIR [ldae-bids options]
#       [--participant-only OPTIONS...] [--group-only OPTIONS...]
#
# ldae-bids options right after OUT_DIR go to both levels (e.g. --session-label, --bids-filter-file
# with a path as seen inside the container); those after --participant-only / --group-only go to one.
# Subjects: every one with a T1w, or those of --participant-label / --participant-label-file.
#
# Submit options:
#   --max-parallel N   array tasks running at once (default 50)
#   --work-root DIR    where each submission keeps its labels, pybids index and Slurm logs
#                      (default OUT_DIR/logs/slurm, one sub-folder per submission)
#   --sbatch-args "A"  extra sbatch arguments for both jobs (e.g. "--account=abc --partition=gpu")
#   --dry-run          build the label list and print the sbatch commands without submitting
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MAX_PARALLEL=50
WORK_ROOT=""
SBATCH_EXTRA=""
DRY_RUN=0
usage() { sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --max-parallel) MAX_PARALLEL=$2; shift 2 ;;
        --work-root) WORK_ROOT=$2; shift 2 ;;
        --sbatch-args) SBATCH_EXTRA=$2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "submit.sh: unknown option $1" >&2; usage >&2; exit 64 ;;
        *) break ;;
    esac
done
if [ $# -lt 3 ]; then usage >&2; exit 64; fi

abspath() { (cd "$1" && pwd); }
[ -f "$1" ] || { echo "submit.sh: $1: no such image" >&2; exit 66; }
[ -d "$2" ] || { echo "submit.sh: $2: no such BIDS folder" >&2; exit 66; }
SIF=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
BIDS_DIR=$(abspath "$2")
mkdir -p "$3"
OUT_DIR=$(abspath "$3")
shift 3

# Split the ldae-bids options: both levels, participant only, group only.
COMMON=(); PART=(); GROUP=(); dest=common
for a in "$@"; do
    case "$a" in
        --participant-only) dest=part; continue ;;
        --group-only) dest=group; continue ;;
    esac
    case "$dest" in
        common) COMMON+=("$a") ;;
        part) PART+=("$a") ;;
        group) GROUP+=("$a") ;;
    esac
done

# The array tasks get one label each: drop the subject selection from their options.
TASK=(); skip=""
for a in ${COMMON[@]+"${COMMON[@]}"}; do
    if [ "$skip" = values ]; then
        case "$a" in -*) skip="" ;; *) continue ;; esac
    elif [ "$skip" = one ]; then
        skip=""; continue
    fi
    case "$a" in
        --participant-label|--participant_label|--participant-label=*|--participant_label=*) skip=values; continue ;;
        --participant-label-file|--participant_label_file) skip=one; continue ;;
        --participant-label-file=*|--participant_label_file=*) continue ;;
    esac
    TASK+=("$a")
done

# One folder per submission: its labels, its pybids index (fresh: a dataset that changed since an
# earlier submission is indexed anew, and jobs still running keep theirs) and its Slurm logs.
WORK_ROOT=${WORK_ROOT:-$OUT_DIR/logs/slurm}
mkdir -p "$WORK_ROOT"
RUN_DIR=$(mktemp -d "$(abspath "$WORK_ROOT")/$(date -u +%Y%m%d-%H%M%S)-XXXX")
DB_DIR=$RUN_DIR/bids-db
LABELS=$RUN_DIR/labels.txt
mkdir -p "$DB_DIR"

# Labels, inside the image with the same binds as the tasks: the pybids index is built here once,
# under the paths the tasks see, and the dataset is validated once.
VALIDATE=(--validate)
for a in ${COMMON[@]+"${COMMON[@]}"}; do
    case "$a" in --skip-bids-validation|--skip_bids_validation) VALIDATE=() ;; esac
done
apptainer exec --cleanenv -B "$BIDS_DIR:/data:ro" -B "$DB_DIR:/bids-db" "$SIF" \
    ldae-bids-tools list-participants /data --bids-database-dir /bids-db \
    ${VALIDATE[@]+"${VALIDATE[@]}"} ${COMMON[@]+"${COMMON[@]}"} > "$LABELS.tmp"
mv "$LABELS.tmp" "$LABELS"
N=$(grep -c . "$LABELS" || true)
if [ "$N" -eq 0 ]; then echo "submit.sh: no participant to process" >&2; exit 18; fi
echo "$N participant(s) listed in $LABELS"

export SIF BIDS_DIR OUT_DIR LABELS DB_DIR
# shellcheck disable=SC2206  # word splitting of --sbatch-args is intended
EXTRA=($SBATCH_EXTRA)
PART_CMD=(sbatch --parsable --export=ALL --array="1-$N%$MAX_PARALLEL"
          --output="$RUN_DIR/participant-%A_%a.out" ${EXTRA[@]+"${EXTRA[@]}"}
          "$HERE/participant_array.sbatch" ${TASK[@]+"${TASK[@]}"} ${PART[@]+"${PART[@]}"})
GROUP_CMD=(sbatch --parsable --export=ALL --output="$RUN_DIR/group-%j.out" ${EXTRA[@]+"${EXTRA[@]}"}
           "$HERE/group.sbatch" ${COMMON[@]+"${COMMON[@]}"} ${GROUP[@]+"${GROUP[@]}"})

if [ "$DRY_RUN" = 1 ]; then
    printf 'would run:'; printf ' %q' "${PART_CMD[@]}"; echo
    printf 'would run:'; printf ' %q' "${GROUP_CMD[@]:0:2}" "--dependency=afterok:<array job id>" "${GROUP_CMD[@]:2}"; echo
    exit 0
fi
ARRAY_ID=$("${PART_CMD[@]}")
ARRAY_ID=${ARRAY_ID%%;*}
GROUP_ID=$("${GROUP_CMD[@]:0:2}" --dependency="afterok:$ARRAY_ID" "${GROUP_CMD[@]:2}")
GROUP_ID=${GROUP_ID%%;*}
echo "participant array job $ARRAY_ID ($N tasks, at most $MAX_PARALLEL at once), group job $GROUP_ID"
echo "labels, index and Slurm logs: $RUN_DIR; outputs: $OUT_DIR"
