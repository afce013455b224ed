#!/usr/bin/env bash
# Install ldae-bids into a Python environment the way the README does, and bake in what an
# offline compute node needs: TemplateFlow files, the model bundle (inside the package) and
# deepbet's weights (inside its wheel). Ends with `ldae-bids-tools self-check`.
#
# One script for every image and for CI:
#   Singularity.def          containers/install.sh --torch keep
#   containers/Dockerfile    containers/install.sh --torch keep
#   containers/Dockerfile.cpu  TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu containers/install.sh
#   CI / offline             containers/install.sh --python VENV/bin/python --templateflow-from ../shared/templateflow
set -euo pipefail

TORCH_PIN="torch==2.13.0"

usage() {
    cat <<EOF
Usage: containers/install.sh [options]

  --python PY              Python of the target environment (default: \$PYTHON or python3)
  --torch SPEC|keep        torch to install first (default: $TORCH_PIN; 'keep' keeps the torch already
                           installed, e.g. the CUDA build of a pytorch/pytorch base image).
                           \$TORCH_INDEX_URL, when set, is the index torch comes from (CPU wheels).
  --templateflow-from DIR  copy TemplateFlow files from DIR (a TemplateFlow home) instead of downloading
                           (default: containers/templateflow/ when it exists, for offline image builds)
  --model-from DIR         put this model bundle in the package (ldae_bids/data/models/ldae-compact-ixi)
  --no-model               do not require the default model bundle (self-check skips it)
  --no-validator           do not install bids-validator-deno (the app then runs basic BIDS checks only)
  --no-self-check          skip the final self-check
  --editable               pip install -e (development) instead of a regular install

Environment: TEMPLATEFLOW_HOME (default /opt/templateflow; keep it outside \$HOME, which Apptainer
mounts over the image), PIP_NO_CACHE_DIR, TORCH_INDEX_URL.
EOF
}

PYTHON=${PYTHON:-python3}
TORCH_SPEC=$TORCH_PIN
TF_FROM=""
MODEL_FROM=""
CHECK_ARGS=()
SELF_CHECK=1
VALIDATOR=1
EDITABLE=()
while [ $# -gt 0 ]; do
    case "$1" in
        --python) PYTHON=$2; shift 2 ;;
        --torch) TORCH_SPEC=$2; shift 2 ;;
        --templateflow-from) TF_FROM=$2; shift 2 ;;
        --model-from) MODEL_FROM=$2; shift 2 ;;
        --no-model) CHECK_ARGS+=(--no-model); shift ;;
        --no-self-check) SELF_CHECK=0; shift ;;
        --no-validator) VALIDATOR=0; shift ;;
        --editable) EDITABLE=(-e); shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 64 ;;
    esac
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export TEMPLATEFLOW_HOME=${TEMPLATEFLOW_HOME:-/opt/templateflow}
export TEMPLATEFLOW_AUTOUPDATE=0
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
PIP=("$PYTHON" -m pip install)
step() { printf '\n==> %s\n' "$*"; }

"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), "ldae-bids needs Python >= 3.10"'

step "1/6 torch ($TORCH_SPEC)"
if [ "$TORCH_SPEC" != keep ]; then
    "${PIP[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
fi
TORCH_VERSION=$("$PYTHON" -c 'import torch; print(torch.__version__)')
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda or "none (CPU build)")'
# Nothing below may replace this torch (e.g. a CUDA base image's build by a PyPI one).
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"

step "2/6 model bundle"
BUNDLE="$REPO/ldae_bids/data/models/ldae-compact-ixi"
if [ -n "$MODEL_FROM" ]; then
    [ -f "$MODEL_FROM/metadata.json" ] || { echo "install.sh: $MODEL_FROM is not a model bundle (no metadata.json)" >&2; exit 66; }
    mkdir -p "$BUNDLE"
    cp -R "$MODEL_FROM"/. "$BUNDLE"/
fi
if [ -f "$BUNDLE/metadata.json" ]; then
    echo "bundle: $BUNDLE (shipped inside the package)"
else
    echo "WARNING: no model bundle at $BUNDLE: the image will have no default model" >&2
fi

step "3/6 ldae-bids, the example plugin, the BIDS validator"
if [ ${#EDITABLE[@]} -eq 0 ]; then
    # setuptools packs whatever a stale build/ holds: start clean (a copied checkout may carry one)
    rm -rf "$REPO/build" "$REPO/plugins/ldae-bids-example/build"
fi
"${PIP[@]}" -c "$CONSTRAINTS" ${EDITABLE[@]+"${EDITABLE[@]}"} "$REPO"
"${PIP[@]}" -c "$CONSTRAINTS" ${EDITABLE[@]+"${EDITABLE[@]}"} "$REPO/plugins/ldae-bids-example"
if [ "$VALIDATOR" = 1 ]; then
    "${PIP[@]}" -c "$CONSTRAINTS" "bids-validator-deno>=2"   # the official validator, offline (a deno binary)
fi

step "4/6 TemplateFlow files into TEMPLATEFLOW_HOME=$TEMPLATEFLOW_HOME"
mkdir -p "$TEMPLATEFLOW_HOME"
if [ -z "$TF_FROM" ] && [ -d "$REPO/containers/templateflow" ]; then
    TF_FROM="$REPO/containers/templateflow"   # an offline image build: the files were put there first
fi
if [ -n "$TF_FROM" ]; then
    [ -d "$TF_FROM" ] || { echo "install.sh: --templateflow-from $TF_FROM: no such folder" >&2; exit 66; }
    chmod -R u+w "$TEMPLATEFLOW_HOME" 2>/dev/null || true   # a second run over read-only copies
    cp -R "$TF_FROM"/. "$TEMPLATEFLOW_HOME"/
    export LDAE_TEMPLATEFLOW_OFFLINE=1   # what is not in the copy is missing: never the network
fi
# The app's own look-up: a no-op for files already there, a TemplateFlow download otherwise.
"$PYTHON" - <<'EOF'
from ldae_bids.selfcheck import TEMPLATE_FILES
from ldae_bids.templates import get_template

for template, res, suffix, desc in TEMPLATE_FILES:
    print(get_template(resolution=res, suffix=suffix, desc=desc, template=template))
EOF
chmod -R a+rX "$TEMPLATEFLOW_HOME"

step "5/6 deepbet weights"
"$PYTHON" - <<'EOF'
from pathlib import Path

from deepbet.utils import DATA_PATH

from ldae_bids.selfcheck import DEEPBET_WEIGHTS

for name in DEEPBET_WEIGHTS:
    path = Path(DATA_PATH) / "models" / name
    print(path, path.stat().st_size, "bytes")
EOF

step "6/6 self-check"
if [ "$SELF_CHECK" = 1 ]; then
    "$PYTHON" -m ldae_bids.cli.tools self-check ${CHECK_ARGS[@]+"${CHECK_ARGS[@]}"}
else
    echo "skipped (--no-self-check)"
fi
echo "ldae-bids installed: $("$PYTHON" -c 'import ldae_bids; print(ldae_bids.__version__)')"
