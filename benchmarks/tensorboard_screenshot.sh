#!/bin/bash
# The README's TensorBoard picture, made here: three runs of the digits CNN
# (2-rank PyTorch data parallel, a 2-stage TensorFlow pipeline, and one
# process at a lower LR for contrast), TensorBoard on their run directories,
# and a headless Chromium screenshot of the Scalars dashboard (its SVG charts
# draw without a GPU; the Time Series dashboard's WebGL ones stay blank).
#   bash benchmarks/tensorboard_screenshot.sh [OUT.png]   (from the repository root, after make install)
set -euo pipefail
out=$(realpath -m "${1:-docs/img/tensorboard_runs.png}")
repo=$(pwd)
work=$(mktemp -d)
trap 'kill "${board:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
command -v chromium >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
export PATH="$repo/.venv/bin:$PATH" OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 TF_CPP_MIN_LOG_LEVEL=3
flags=(--epochs 15 --lr 0.05 --log-every 5 --no-progress)
cd "$work"
horovodrun -np 2 python "$repo/train_torch/main.py" "${flags[@]}" --run-dir runs/torch-data-np2 | tail -1
mpirun -np 2 --bind-to none python "$repo/train_tf/main.py" "${flags[@]}" --mode model --pp 2 --microbatches 4 \
    --run-dir runs/tf-model-pp2 | tail -1
python "$repo/train_torch/main.py" "${flags[@]}" --lr 0.01 --run-dir runs/torch-1proc-lr0.01 | tail -1
port=6123
tensorboard --logdir runs --port "$port" --host 127.0.0.1 >tensorboard.log 2>&1 &
board=$!
for _ in $(seq 60); do
    curl -sf "http://127.0.0.1:$port/data/runs" | grep -q lr0.01 && break
    sleep 1
done
chromium --headless=new --no-sandbox --hide-scrollbars --window-size=1400,760 --virtual-time-budget=20000 \
    --screenshot="$out" "http://127.0.0.1:$port/?darkMode=false#scalars&_smoothingWeight=0&tagFilter=test%7Ctrain%2Floss" \
    2>/dev/null
echo "wrote $out"
