#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md (section 5) in one command, on the first CUDA device:
# the library's CUDA tests, then both benchmark scripts at sizes that take about 10 minutes on an
# H200, and where a penalized MLP step's time goes on the device (torch.profiler). Each step has a time limit; a step that fails or runs out leaves its log and the next runs.
#
#   bash benchmarks/cuda_figures.sh [LOG_DIR]      # default LOG_DIR: results/cuda
#   PYTHON=.venv/bin/python bash benchmarks/cuda_figures.sh
set -u
PY=${PYTHON:-python3}
LOGS=${1:-results/cuda}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run COMMAND into LOGS/NAME.log, show its end
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most $limit s): $*"
    timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
    echo "   exit status $? -> $LOGS/$name.log"
    tail -n 24 "$LOGS/$name.log"
}

step tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
step importance_resnet18 300 "$PY" benchmarks/bench_importance.py --device cuda --models resnet18 --n 256 --rounds 3 --no-memory
step importance_resnet18_n1024 120 "$PY" benchmarks/bench_importance.py --device cuda --models resnet18 --n 1024 --rounds 3 --no-memory \
    --variants "avalanche EWCPlugin (minibatch)" "ours empirical_fisher" "vmap(grad)"
step importance_mlp 90 "$PY" benchmarks/bench_importance.py --device cuda --models mlp --rounds 3 --no-memory
step penalty_mlp 150 "$PY" benchmarks/bench_penalty.py --device cuda --models mlp --rounds 3 --budget 1.0 --plot "$LOGS/step_time_vs_T.png"
step penalty_profile_mlp 120 "$PY" benchmarks/bench_penalty.py --device cuda --models mlp --T 1 --rounds 1 --budget 0.5 --profile \
    --plot "$LOGS/profile_step_time_vs_T.png"
step penalty_resnet18 240 "$PY" benchmarks/bench_penalty.py --device cuda --models resnet18 --rounds 2 --budget 0.6 --plot "$LOGS/step_time_vs_T.png"
step memory_resnet18 300 "$PY" benchmarks/bench_importance.py --device cuda --models resnet18 --n 256 --rounds 1 \
    --variants "avalanche EWCPlugin (minibatch)" "ours empirical_fisher" "ours expected_fisher" "vmap(grad)"
