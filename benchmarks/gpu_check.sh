#!/usr/bin/env bash
# The GPU check on a bare GPU machine (benchmarks/README.md, "Running the GPU check on a bare GPU
# machine"), run from a copy of the repository:
#
#     bash benchmarks/gpu_check.sh OUTPUT_DIR [options of python -m benchmarks.gpu_check]
#
# 1. installs the wheels carried in .whl/ (hydra-core, omegaconf, antlr4-python3-runtime) into
#    /tmp/site, without the network, and puts /tmp/site on PYTHONPATH;
# 2. builds pydensecrf2 from .whl/pydensecrf2-*.tar.gz when pydensecrf is not importable yet (with
#    the machine's Cython, setuptools and compiler); without it the pydensecrf parts are skipped;
# 3. runs python -m benchmarks.gpu_check OUTPUT_DIR: pytest -m gpu, then the performance parts,
#    with the time left of GPU_CHECK_TOTAL_S (default 480 s, setup included) as its budget.
#
# Everything lands in OUTPUT_DIR (7 files, no sub-folder): setup.log, gpu_check.{json,md,log},
# parts.log, pytest.{log,xml}.  Exit status: that of gpu_check (0 when the report was written).
set -u

if [ $# -lt 1 ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUTPUT_DIR [options of python -m benchmarks.gpu_check]" >&2
    exit 2
fi
OUT=$1
shift
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
TOTAL_S=${GPU_CHECK_TOTAL_S:-480}
MAX_BUDGET_S=${GPU_CHECK_MAX_BUDGET_S:-450}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)

{
    echo "== setup on $(hostname), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "python: $(command -v "$PY") ($("$PY" -V 2>&1))"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    mkdir -p "$SITE"
    if ls .whl/*.whl >/dev/null 2>&1; then
        echo "-- installing carried wheels into $SITE:"
        ls -1 .whl/*.whl
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
            && echo "wheels installed" || echo "WHEEL INSTALL FAILED (parts that need them will fail)"
    else
        echo "-- no .whl/*.whl: using the packages installed here (hydra-core / omegaconf may be missing)"
    fi
    if "$PY" -c "import pydensecrf.densecrf" >/dev/null 2>&1; then
        echo "-- pydensecrf: already importable"
    elif ls .whl/pydensecrf2-*.tar.gz >/dev/null 2>&1; then
        echo "-- building pydensecrf2 from $(ls .whl/pydensecrf2-*.tar.gz | head -1) (Cython $("$PY" -c 'import Cython; print(Cython.__version__)' 2>&1))"
        b=$(date +%s)
        if timeout 300 "$PY" -m pip install --no-build-isolation --no-deps --no-index --no-compile --no-cache-dir \
                --upgrade --target "$SITE" "$(ls .whl/pydensecrf2-*.tar.gz | head -1)"; then
            echo "pydensecrf2 built in $(( $(date +%s) - b )) s"
        else
            echo "PYDENSECRF2 BUILD FAILED after $(( $(date +%s) - b )) s: the pydensecrf parts will be skipped"
        fi
        "$PY" -c "import pydensecrf.densecrf; print('pydensecrf importable')" || echo "pydensecrf NOT importable"
    else
        echo "-- no .whl/pydensecrf2-*.tar.gz: the pydensecrf parts will be skipped"
    fi
    "$PY" -c "import hydra, omegaconf; print('hydra', hydra.__version__, 'omegaconf', omegaconf.__version__)" \
        || echo "hydra / omegaconf NOT importable: the tests part will fail"
} > "$OUT/setup.log" 2>&1

setup_s=$(( $(date +%s) - start ))
budget=$(( TOTAL_S - setup_s - 5 ))
[ "$budget" -gt "$MAX_BUDGET_S" ] && budget=$MAX_BUDGET_S
[ "$budget" -lt 60 ] && budget=60
echo "setup took ${setup_s} s (see $OUT/setup.log); gpu_check budget ${budget} s"
echo "setup took ${setup_s} s; gpu_check budget ${budget} s" >> "$OUT/setup.log"
[ -n "${GPU_CHECK_SETUP_ONLY:-}" ] && exit 0  # rehearsing the installation alone
exec "$PY" -m benchmarks.gpu_check "$OUT" --budget-s "$budget" "$@"
