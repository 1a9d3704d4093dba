#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py), sized for a lent GPU machine: a few minutes on one GPU.
# Run from the repository root. Uses the torch of $PYTHON (default python3); installs nothing when timm and
# safetensors import, else installs wheels carried in .whl/ (see benchmarks/README.md, GPU). The report goes to
# stdout and to ${OUT:-out}/gpu_check.md (out/ is ignored by git: a run's output is never committed; its tables
# are recorded, dated, in benchmarks/README.md, GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import timm, safetensors" 2>/dev/null; then
    if [ -d .whl ]; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "gpu_check: timm / safetensors missing and no .whl/ folder to install them from" >&2
        exit 2
    fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OFFICIAL=()
[ -d "${KCLA_REPO:-/nonexistent}" ] && OFFICIAL+=(--official-kcla "$KCLA_REPO")
[ -d "${MRLA_REPO:-/nonexistent}" ] && OFFICIAL+=(--official-mrla "$MRLA_REPO")
REPORT_DIR=${OUT:-out}
mkdir -p "$REPORT_DIR"
exec timeout "${GPU_CHECK_TIMEOUT:-280}" "$PYTHON" benchmarks/gpu_check.py --out "$REPORT_DIR/gpu_check.md" \
    ${OFFICIAL[@]+"${OFFICIAL[@]}"} "$@"
