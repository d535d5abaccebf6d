#!/usr/bin/env bash
# The prepared GPU check (issue 14): one command, about 8 minutes on one H200, from the repository root:
#     bash scripts/gpu_check.sh            (or: make gpu-check)
# Stages, in this order, each under its own time limit and all under one overall deadline:
#   floor    bare torch.mm of 8192 x 8192 float32, TF32 off and on (bench.tools.matmul_rate)
#   hessian  python -m bench hessian-bench on cuda: the paper net (D = 13,410, laplace-torch rows too) and
#            hidden 52,52,52,52 (D = 49,194), N = 1024
#   tests    pytest --device cuda on the tests that fit and predict methods, and the training-step tests
#   paper    python -m bench run --preset paper --device cuda (all methods): wall time per method and
#            stage (the summary's timing table; on a timeout, the stages of the methods that finished)
#   profile  python -m bench step-profile on cuda at batch 16 (with torch.compile of the whole step) and 64
# GPU_CHECK_STAGES picks stages (default "floor hessian tests paper profile"), e.g. a second call with
# GPU_CHECK_STAGES=paper GPU_CHECK_PAPER_S=540 finishes the paper run alone.
# Everything goes to $OUT (the device tool's folder; default ./gpu_out), at most 8 files: gpu_check.log
# (all output, with the wall time of each stage), floor.log, hessian.log, profile.log, tests.log, paper.log,
# paper_timings.csv, paper_results.csv.
# Without CUDA it stops at once with one line and exit code 2.
# The H200 image lacks pytorch-metric-learning, laplace-torch (and its backends) and mlxtend, and has no
# Fashion-MNIST: `bash scripts/gpu_prepare.sh` (on a machine with PyPI) puts their wheels and the data
# into .gpu/ (git-ignored); carry ".gpu" with the device call. This script installs from there.
# Limits in seconds, from the environment: GPU_CHECK_TOTAL_S (default 560; run the device call with
# timeout_s 600) and GPU_CHECK_{FLOOR,HESSIAN,TESTS,PAPER,PROFILE}_S (30, 100, 120, 240, 90); PY (python3).
# GPU_CHECK_SMOKE=1 GPU_CHECK_DEVICE=cpu: the same plumbing at toy sizes on a CPU (a dry run of this script).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
PY="${PY:-python3}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_TOTAL_S:-560}))
STAGES=" ${GPU_CHECK_STAGES:-floor hessian tests paper profile} "
say() { echo "[gpu-check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

DEVICE="${GPU_CHECK_DEVICE:-cuda}"
if [ "${DEVICE#cuda}" != "$DEVICE" ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$LOG"; then
    echo "gpu-check: no CUDA device here (torch.cuda.is_available() is False); this check needs a GPU" | tee -a "$LOG" >&2
    exit 2
fi
if ls .gpu/wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_site \
        .gpu/wheels/*.whl >>"$LOG" 2>&1 || { say "installing .gpu/wheels failed (see $LOG)"; exit 2; }
    export PYTHONPATH="/tmp/gpu_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
if ! "$PY" -c "import pytorch_metric_learning, laplace, mlxtend" 2>>"$LOG"; then
    say "missing Python packages (see $LOG): run scripts/gpu_prepare.sh where PyPI answers, and carry .gpu"
    exit 2
fi
DATA=()
[ -d .gpu/data/fashion-mnist ] && DATA=(--data-dir .gpu/data/fashion-mnist)
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')" 2>&1 | tee -a "$LOG"
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then  # toy sizes
    MM=(--n 256 --repeats 2); HB=(--n 64 --data random --hidden 8,8); HB_WIDE=(--n 64 --data random --hidden 16,16 --no-laplace-torch)
    SP=(--steps 8 --rounds 1); SP_COMPILE=off; TESTS=(tests/test_train_step.py); PAPER=(--preset smoke --dataset synthetic)
else
    MM=(--n 8192); HB=(--n 1024 "${DATA[@]}"); HB_WIDE=(--n 1024 --hidden 52,52,52,52 --no-laplace-torch "${DATA[@]}")
    SP=(--steps 300); SP_COMPILE=step; PAPER=(--preset paper "${DATA[@]}")
    TESTS=(tests/test_method_contract.py tests/test_laplace_methods.py tests/test_baselines.py tests/test_prob_embeddings.py
           tests/test_online_la.py tests/test_sensitivity.py tests/test_methods_on_backbones.py tests/test_train_step.py
           tests/test_train_cache.py)
fi

# stage NAME LIMIT_S FILE CMD...: run CMD under min(LIMIT_S, time left), its output to $OUT/FILE and the log
stage() {
    local name=$1 limit=$2 file=$3
    shift 3
    [ "${STAGES/ $name /}" = "$STAGES" ] && return 0  # not asked for
    local left=$((DEADLINE - $(date +%s)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        say "skip $name: the overall deadline is reached"
        return 0
    fi
    say "start $name (limit ${limit} s): $*"
    local t0
    t0=$(date +%s%N)
    timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$OUT/$file" >>"$LOG"
    local rc=${PIPESTATUS[0]}
    say "end $name: exit $rc$([ "$rc" = 124 ] && echo ' (time limit)'), $((($(date +%s%N) - t0) / 1000000)) ms"
}

stage floor "${GPU_CHECK_FLOOR_S:-30}" floor.log "$PY" -m bench.tools.matmul_rate --device "$DEVICE" "${MM[@]}"
stage hessian "${GPU_CHECK_HESSIAN_S:-100}" hessian.log bash -c '"$0" -m bench hessian-bench --device "$1" $2 && "$0" -m bench hessian-bench --device "$1" $3' \
    "$PY" "$DEVICE" "${HB[*]}" "${HB_WIDE[*]}"
stage tests "${GPU_CHECK_TESTS_S:-120}" tests.log "$PY" -m pytest --device "$DEVICE" -q -p no:randomly -p no:cacheprovider "${TESTS[@]}"
RUNS=/tmp/gpu_check_runs
rm -rf "$RUNS"
stage paper "${GPU_CHECK_PAPER_S:-240}" paper.log "$PY" -m bench run "${PAPER[@]}" --device "$DEVICE" --out "$RUNS" --quiet --no-report
[ "${STAGES/ paper /}" != "$STAGES" ] && "$PY" - "$RUNS" "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
"""The paper run's tables to $OUT, or, when it did not finish, the stage times of the methods that did."""
import json, shutil, sys
from pathlib import Path

from bench.run_folder import METHODS, RESULTS, TIMINGS

runs, out = Path(sys.argv[1]), Path(sys.argv[2])
folders = sorted(d for d in runs.iterdir() if d.is_dir() and d.name != "cache") if runs.is_dir() else []
if not folders:
    sys.exit("paper: no run folder")
run = folders[-1]
if (run / TIMINGS).is_file():
    for name in (TIMINGS, RESULTS):
        shutil.copy(run / name, out / f"paper_{name}")
    print(f"paper: finished; {TIMINGS} and {RESULTS} copied to {out}")
else:
    print("paper: not finished; stage seconds of the methods that finished:")
    for f in sorted((run / METHODS).glob("*.json")):
        t = json.loads(f.read_text())["timings"]
        print(f"  {f.stem}: " + ", ".join(f"{r['method']}/{r['stage']} {float(r['seconds']):.1f} s" for r in t))
EOF
stage profile "${GPU_CHECK_PROFILE_S:-90}" profile.log bash -c '"$0" -m bench step-profile --device "$1" --batch 16 $2 --compile "$3" && "$0" -m bench step-profile --device "$1" --batch 64 $2 --no-profiler' \
    "$PY" "$DEVICE" "${SP[*]}" "$SP_COMPILE"
say "done in $(($(date +%s) - START)) s; files under $OUT"
