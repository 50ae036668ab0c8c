# Sourced by the sbatch templates in this folder: what every launch shares.
# Submit from the repository root (sbatch reads $SLURM_SUBMIT_DIR), e.g.
#   FRAMEWORK=tf MODE=hybrid PP=2 sbatch slurm/cpu_mpirun.sbatch
set -euo pipefail

# --- What to train: edit here, or export before sbatch (sbatch passes the environment).
FRAMEWORK=${FRAMEWORK:-torch}          # torch | tf
MODE=${MODE:-data}                     # data | model | hybrid
PP=${PP:-2}                            # model/hybrid: pipeline stages
DP=${DP:-}                             # hybrid: replicas (default: tasks / PP)
MICROBATCHES=${MICROBATCHES:-4}        # model/hybrid
EPOCHS=${EPOCHS:-10}
TRAIN_ARGS=${TRAIN_ARGS:-}             # more flags, e.g. "--dataset cifar10 --data-dir /data/cifar-10-batches-py"
GPU=${GPU:-0}                          # 1: the CUDA venv of make install GPU=1 FRAMEWORK=...
if [ "$GPU" = 1 ]; then VENV=${VENV:-$SLURM_SUBMIT_DIR/.venv-gpu-$FRAMEWORK}; else VENV=${VENV:-$SLURM_SUBMIT_DIR/.venv}; fi
NETWORK_INTERFACE=${NETWORK_INTERFACE:-}   # multi-node: the interface connecting the nodes (eth1, ib0, ...)
RUN_ROOT=${RUN_ROOT:-$SLURM_SUBMIT_DIR/runs}

cd "$SLURM_SUBMIT_DIR"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export PYTHONUNBUFFERED=1
# Open MPI refuses root without these; harmless for other users.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

# Several nodes: name the interface that connects them, or MPI and Gloo may pick one
# that does not (a management or container network) and wait forever. Open MPI's
# spelling serves mpirun and srun's ranks; Horovod's Gloo and NCCL read their own.
NETWORK_FLAGS=()  # horovodrun's
if [ -n "$NETWORK_INTERFACE" ]; then
    export OMPI_MCA_btl_tcp_if_include=$NETWORK_INTERFACE OMPI_MCA_oob_tcp_if_include=$NETWORK_INTERFACE
    export HOROVOD_GLOO_IFACE=$NETWORK_INTERFACE NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$NETWORK_INTERFACE}
    NETWORK_FLAGS=(--network-interface "$NETWORK_INTERFACE")
fi

# One run directory per job name (metrics, TensorBoard events, checkpoints, the
# command line): a resubmitted or requeued job resumes in it.
RUN_DIR="$RUN_ROOT/$SLURM_JOB_NAME"
CHECKPOINT_DIR="$RUN_DIR/checkpoints"
train_args=(--mode "$MODE" --epochs "$EPOCHS" --run-dir "$RUN_DIR" --no-progress)
if [ "$MODE" != data ]; then
    train_args+=(--pp "$PP" --microbatches "$MICROBATCHES")
    [ "$MODE" = hybrid ] && [ -n "$DP" ] && train_args+=(--dp "$DP")
fi
if compgen -G "$CHECKPOINT_DIR/ckpt-epoch*" >/dev/null; then
    train_args+=(--resume)
fi
# shellcheck disable=SC2206
TRAIN=(python "train_$FRAMEWORK/main.py" "${train_args[@]}" $TRAIN_ARGS)

echo "job $SLURM_JOB_ID ($SLURM_JOB_NAME) on $SLURM_JOB_NUM_NODES node(s), $SLURM_NTASKS task(s):" \
     "$FRAMEWORK $MODE; restart ${SLURM_RESTART_COUNT:-0}; run directory $RUN_DIR"

descendants() {
    local child
    for child in $(pgrep -P "$1"); do echo "$child"; descendants "$child"; done
}

# Ask the training to stop: srun relays signals to every task; under mpirun or
# horovodrun, signal the ranks on this node (one is enough: the ranks agree on
# the stop at the next step boundary).
signal_training() {
    if [ "$LAUNCHER" = srun ]; then
        kill -USR1 "$launcher_pid" 2>/dev/null || true
        return
    fi
    local process
    for process in $(descendants "$launcher_pid"); do
        if tr '\0' ' ' <"/proc/$process/cmdline" 2>/dev/null | grep -q "train_.*/main.py"; then
            kill -USR1 "$process" 2>/dev/null || true
        fi
    done
}

# What the run directory's command.sh records: the launcher's line as this script types
# it (up to the training command), and how to submit the job again. Slurm 22.05 keeps no
# submit line, so that one is rebuilt from the job: its size, name, script and settings.
launcher_line() {
    local word words=()
    for word in "$@"; do
        [ "$word" = python ] && break
        words+=("$word")
    done
    printf '%q ' "${words[@]}"
}

submit_line() {
    local script setting settings=()
    script=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -o 'Command=[^ ]*' | cut -d= -f2 || true)
    for setting in FRAMEWORK MODE PP DP MICROBATCHES EPOCHS TRAIN_ARGS GPU NETWORK_INTERFACE; do
        [ -n "${!setting}" ] && settings+=("$setting=${!setting}")
    done
    printf '%q ' "${settings[@]}" sbatch "--nodes=$SLURM_JOB_NUM_NODES" \
        "--ntasks-per-node=${SLURM_NTASKS_PER_NODE%%(*}" "--job-name=$SLURM_JOB_NAME" "${script:-$0}"
}

# Run the launcher; on the preemption/time-limit signal (#SBATCH --signal=B:USR1@...)
# or scancel's TERM, let the training checkpoint and exit 0, then requeue the job.
run_preemptible() {
    CNN_PARALLEL_LAUNCH=$(launcher_line "$@") CNN_PARALLEL_SUBMIT=$(submit_line) "$@" &
    launcher_pid=$!
    preempted=0
    trap 'preempted=1; echo "signal received: asking the training to checkpoint"; signal_training' USR1 TERM
    local status=0
    while :; do
        wait "$launcher_pid" && status=0 || status=$?
        kill -0 "$launcher_pid" 2>/dev/null || break  # else a trapped signal interrupted wait
    done
    trap - USR1 TERM
    if [ "$preempted" = 1 ] && [ "$status" = 0 ]; then
        echo "checkpoint saved; requeueing job $SLURM_JOB_ID to resume from it"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$status"
}
