# Shared by the stage scripts in slurm/ (sourced, not run): start one stage on the job's nodes, then requeue
# the job when the run stopped for the scheduler's signal with a checkpoint saved. See slurm/README.md.
#
#   slurm_main STAGE DEFAULT_CONFIG [key=value ...]      e.g. slurm_main pretrain configs/gpt2_124m.yaml "$@"
#
# Environment (all optional):
#   CONFIG          YAML config (default: the stage script's); relative paths: the submit dir, else the repo
#   NPROC_PER_NODE  ranks per node (default: the GPUs SLURM gave this node, else 1)
#   LAUNCHER        torchrun (default: one srun task per node runs torchrun) | srun (one srun task per rank)
#   OUT_DIR         run directory (default runs/<job name>-<job id>): a requeued job has the same id, so it
#                   finds its checkpoints; set it to continue an earlier job's run from a new job
#   RDZV_PORT       torchrun's rendezvous port on the first node (default 20000 + job id % 20000)
#   RDZV_READ_TIMEOUT  seconds a node tries to reach the rendezvous store on the first node before it fails
#                   with one line naming the endpoint (default 60; torchrun's --rdzv-conf read_timeout)
#   RDZV_JOIN_TIMEOUT  seconds the rendezvous waits for every node to join (default 600; join_timeout)
#   MAX_RESTARTS    torchrun --max-restarts after a crashed worker (default 0; see slurm/README.md)
#   PYTHON          interpreter (default python3)
#
# Why the signal takes this path (details in slurm/README.md): SLURM delivers `--signal=USR1@grace` and
# `scancel --signal=USR1` to every process of the job's steps. The ranks save and exit 75. torchrun, which
# would die of SIGUSR1 (it only handles TERM/INT/HUP/QUIT), ignores it: the disposition is set before its
# exec, and the ranks install their own handler. torchrun then reports any non-zero worker as its own exit
# 1, so the ranks' code comes back through $LLM_DIST_EXIT_FILE (written by llm_dist/cli.py) instead.

# The first host of the job's node list: the torchrun rendezvous endpoint and the srun-per-rank master.
slurm_first_host() {
    scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a SLURM job}" | head -n1
}

# A port derived from the job id, so two jobs sharing a node do not collide (llm_dist/distributed.py uses
# the same rule when srun starts the ranks itself).
slurm_port() {
    echo $((20000 + ${SLURM_JOB_ID:?not inside a SLURM job} % 20000))
}

# The config path as given, or under the repository when it is not relative to the current directory.
slurm_config_path() {
    if [ -e "$1" ] || [ ! -e "$LLM_DIST_ROOT/$1" ]; then echo "$1"; else echo "$LLM_DIST_ROOT/$1"; fi
}

# Fill the array SLURM_CMD with the srun command line that starts STAGE: slurm_build_cmd STAGE CONFIG [k=v ...]
slurm_build_cmd() {
    local stage=$1 config=$2
    shift 2
    local nnodes=${SLURM_NNODES:-1} nproc=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}} py=${PYTHON:-python3}
    local cpus_node=${SLURM_CPUS_ON_NODE:-$nproc}
    local script=$LLM_DIST_ROOT/launch/$stage.py
    local -a stage_args=(--config "$config" "out_dir=$OUT_DIR" "$@")  # later overrides win: the user's last
    case "${LAUNCHER:-torchrun}" in
        torchrun)
            # One task per node with the node's CPUs (srun no longer inherits --cpus-per-task since 22.05).
            SLURM_CMD=(srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-$cpus_node}"
                --kill-on-bad-exit=1
                bash -c 'trap "" USR1; exec "$@"' llm_dist-task  # torchrun survives SIGUSR1; see the header
                # llm_dist.torchrun is torchrun with an unreachable rendezvous reported as one line.
                "$py" -m llm_dist.torchrun --nnodes="$nnodes" --nproc_per_node="$nproc"
                --rdzv-backend=c10d --rdzv-endpoint="$(slurm_first_host):${RDZV_PORT:-$(slurm_port)}"
                --rdzv-id="$SLURM_JOB_ID" --max-restarts="${MAX_RESTARTS:-0}"
                --rdzv-conf="read_timeout=${RDZV_READ_TIMEOUT:-60},join_timeout=${RDZV_JOIN_TIMEOUT:-600}"
                "$script" "${stage_args[@]}")
            ;;
        srun)
            # One task per rank: llm_dist/distributed.py reads SLURM_PROCID/NTASKS/LOCALID; every task sees
            # all of the node's GPUs and picks cuda:<SLURM_LOCALID>. --ntasks explicitly: srun would otherwise
            # take the job's SLURM_NTASKS (one per node) from the environment.
            local cpt=$((cpus_node / nproc))
            # The master as scontrol expands the node list (llm_dist/distributed.py's own parsing is the fallback).
            export MASTER_ADDR=${MASTER_ADDR:-$(slurm_first_host)} MASTER_PORT=${MASTER_PORT:-$(slurm_port)}
            SLURM_CMD=(srun --nodes="$nnodes" --ntasks=$((nnodes * nproc)) --ntasks-per-node="$nproc" --cpus-per-task=$((cpt > 0 ? cpt : 1))
                --kill-on-bad-exit=1 "$py" -u "$script" "${stage_args[@]}")
            ;;
        *)
            echo "slurm: LAUNCHER=${LAUNCHER} is not one of: torchrun, srun" >&2
            return 2
            ;;
    esac
}

# What the job does after the step ended: slurm_after_run SRUN_RC. Reads the ranks' exit code from
# $LLM_DIST_EXIT_FILE; 75 (stopped by SIGUSR1/SIGTERM, checkpoint saved) requeues the job, which then
# resumes from that checkpoint (checkpoint.resume=auto). Returns the job's exit code.
slurm_after_run() {
    local srun_rc=$1 code=""
    [ -f "$LLM_DIST_EXIT_FILE" ] && code=$(tr -dc 0-9 <"$LLM_DIST_EXIT_FILE")
    if [ "$code" = 75 ]; then
        echo "slurm: run stopped by a signal after saving a checkpoint: requeueing job $SLURM_JOB_ID" \
             "(restart $((${SLURM_RESTART_COUNT:-0} + 1)))"
        if scontrol requeue "$SLURM_JOB_ID"; then
            return 0  # SLURM ends this instance now; the job starts again when it is scheduled
        fi
        echo "slurm: scontrol requeue failed: resubmit with OUT_DIR=$OUT_DIR to resume" >&2
        return 75
    fi
    if [ -n "$code" ] && [ "$code" != 0 ]; then
        echo "slurm: run failed with exit code $code (see the error above)" >&2
        return "$code"
    fi
    if [ "$srun_rc" != 0 ]; then
        echo "slurm: the step failed (srun exit code $srun_rc)${code:+ after the run exited $code}" >&2
        return "$srun_rc"
    fi
    echo "slurm: run finished; run directory: $OUT_DIR"
    return 0
}

# A signal that reaches the batch shell (`--signal=B:USR1@...`, `scancel --batch` or `--full`) is passed
# on to the steps, where the ranks are; steps that already got it only see a second, harmless request.
_slurm_forward() {
    echo "slurm: batch shell received SIG$1: passing it on to the job's steps"
    scancel --signal="$1" "$SLURM_JOB_ID" || true
}

slurm_main() {
    local stage=$1 default_config=$2
    shift 2
    : "${SLURM_JOB_ID:?slurm_main: not inside a SLURM job (submit with sbatch)}"
    export LLM_DIST_ROOT
    local config
    config=$(slurm_config_path "${CONFIG:-$default_config}")
    OUT_DIR=${OUT_DIR:-runs/${SLURM_JOB_NAME:-$stage}-$SLURM_JOB_ID}
    export LLM_DIST_EXIT_FILE
    LLM_DIST_EXIT_FILE=$(realpath -m "$OUT_DIR")/slurm-exit-code
    rm -f "$LLM_DIST_EXIT_FILE"  # left by the instance before a requeue
    # torchrun restarts must not reuse its rendezvous store (pytorch/pytorch#135712); harmless otherwise.
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    local nproc=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_ON_NODE:-$nproc} / nproc > 0 ? ${SLURM_CPUS_ON_NODE:-$nproc} / nproc : 1 ))}
    export PYTHONUNBUFFERED=1
    export PYTHONPATH=$LLM_DIST_ROOT${PYTHONPATH:+:$PYTHONPATH}  # for python -m llm_dist.torchrun

    slurm_build_cmd "$stage" "$config" "$@" || return $?
    echo "slurm: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}:" \
         "${SLURM_NNODES:-1} node(s) x $nproc rank(s), ${LAUNCHER:-torchrun}; config $config; out_dir $OUT_DIR"
    echo "slurm: ${SLURM_CMD[*]}"

    # srun in the background so that the shell can run its traps while waiting.
    trap '_slurm_forward USR1' USR1
    trap 'echo "slurm: batch shell received SIGTERM (time limit or preemption); waiting for the ranks to save"' TERM
    "${SLURM_CMD[@]}" &
    local pid=$! rc
    while kill -0 "$pid" 2>/dev/null; do
        wait "$pid"  # returns early (>128) when a trap ran; srun may still be running
    done
    wait "$pid"  # srun's own exit status (bash keeps it for a reaped child)
    rc=$?
    trap - USR1 TERM
    slurm_after_run "$rc"
}
