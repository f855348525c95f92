# Shared helpers for the sbatch scripts in this folder. Sourced by them, never run on its own.
#
# Settings (environment; `symdiff submit` writes the first three into the rendered script):
#   SYMDIFF_ROOT          the checkout (holds slurm/ and .venv/); defaults to the submit directory
#   SYMDIFF_VENV          virtual environment to activate (default $SYMDIFF_ROOT/.venv)
#   SYMDIFF_ENV_FILE      optional file sourced at job start for site settings and secrets (keep it OUTSIDE the
#                         repository: scripts and run directories must never contain keys)
#   SYMDIFF_PREEMPT_EXIT  exit code with which `symdiff train` says "checkpointed after a signal, not finished"
#   SYMDIFF_MAX_RESTARTS  stop requeueing after this many restarts (guards against a requeue loop)
#   MASTER_PORT           rendezvous port (default derived from the job id so concurrent jobs do not collide)

symdiff_log() {
    printf '[symdiff %s job %s.%s] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${SLURM_JOB_ID:-none}" \
        "${SLURM_RESTART_COUNT:-0}" "$*" >&2
}

symdiff_die() {
    symdiff_log "error: $*"
    exit 1
}

# Working directory, virtual environment, per-job caches and thread counts.
symdiff_setup() {
    SYMDIFF_ROOT=${SYMDIFF_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
    [ -f "$SYMDIFF_ROOT/slurm/lib.sh" ] || symdiff_die "SYMDIFF_ROOT=$SYMDIFF_ROOT is not a SymDiff-HPC checkout"
    export SYMDIFF_ROOT
    local venv=${SYMDIFF_VENV:-$SYMDIFF_ROOT/.venv}
    [ -x "$venv/bin/symdiff" ] || symdiff_die "no symdiff in $venv (run tools/setup.sh or set SYMDIFF_VENV)"
    export VIRTUAL_ENV=$venv PATH="$venv/bin:$PATH"
    if [ -n "${SYMDIFF_ENV_FILE:-}" ]; then
        [ -r "$SYMDIFF_ENV_FILE" ] || symdiff_die "SYMDIFF_ENV_FILE=$SYMDIFF_ENV_FILE is not readable"
        # shellcheck disable=SC1090
        source "$SYMDIFF_ENV_FILE"
    fi
    # One intra-op thread pool per task sized to its CPUs; the default (all cores) oversubscribes the node.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    # Compiled-kernel caches shared by all jobs of this checkout: the first job JIT-builds, later ones reuse.
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$SYMDIFF_ROOT/.cache/torch_extensions}
    export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$SYMDIFF_ROOT/.cache/triton}
    export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$SYMDIFF_ROOT/.cache/inductor}
    export PYTHONUNBUFFERED=1
}

# torch.distributed rendezvous from SLURM's allocation: the first node of the job hosts the TCP store.
# The trainer itself maps SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID to RANK/WORLD_SIZE/LOCAL_RANK.
symdiff_rendezvous() {
    if [ -z "${MASTER_ADDR:-}" ]; then
        MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
        [ -n "$MASTER_ADDR" ] || MASTER_ADDR=127.0.0.1
    fi
    export MASTER_ADDR
    # Same formula as symdiff.train.launch, so a port in the log is the port the trainer used.
    export MASTER_PORT=${MASTER_PORT:-$((29500 + ${SLURM_JOB_ID:-0} % 20000))}
}

# NCCL settings for H100 nodes with InfiniBand. Only defaults: a site's own values (from the module system or
# SYMDIFF_ENV_FILE) win. Which HCAs and which bootstrap interface to use is site-specific: see docs/cluster.md.
symdiff_gpu_env() {
    [ "${SLURM_GPUS_ON_NODE:-0}" != "0" ] || [ -n "${SLURM_GPUS_PER_NODE:-}" ] || return 0
    # A dead or stuck rank becomes an error that ends the job instead of a hang until the time limit.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # Bootstrap over a real interface, never loopback or a container bridge.
    export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker0}
    # Larger IB timeout: transient fabric hiccups on big jobs otherwise abort the whole run.
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
}

symdiff_banner() {
    symdiff_log "nodes=${SLURM_JOB_NUM_NODES:-1} (${SLURM_JOB_NODELIST:-local}) tasks=${SLURM_NTASKS:-1}" \
        "cpus/task=${SLURM_CPUS_PER_TASK:-?} gpus/node=${SLURM_GPUS_ON_NODE:-0}" \
        "master=${MASTER_ADDR:-}:${MASTER_PORT:-} restart=${SLURM_RESTART_COUNT:-0} cwd=$PWD"
}

# One task per GPU (or per --ntasks on CPU). Every task sees all GPUs of its node and picks its own by
# SLURM_LOCALID: hiding the others with per-task CUDA_VISIBLE_DEVICES breaks NCCL's NVLink peer access.
symdiff_srun() {
    srun --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" "$@"
}

# Run a training command; if it reports "checkpointed after a preemption/time-limit signal", requeue this job
# so that the next start resumes from that checkpoint in the same run directory. Crashes are not requeued.
symdiff_train_with_requeue() {
    local code=${SYMDIFF_PREEMPT_EXIT:?SYMDIFF_PREEMPT_EXIT must be set}
    local max=${SYMDIFF_MAX_RESTARTS:-50}
    local rc=0
    "$@" || rc=$?
    if [ "$rc" -eq 0 ]; then
        symdiff_log "training finished"
        return 0
    fi
    # A task killed by USR1 itself (srun reports 128+USR1) got the signal before the trainer had installed its
    # handler, i.e. during start-up: nothing was trained since the last complete checkpoint, so requeueing
    # resumes exactly as after a checkpointed stop.
    local killed_by_usr1=$((128 + $(kill -l USR1)))
    if [ "$rc" -eq "$killed_by_usr1" ]; then
        symdiff_log "signal arrived during start-up (exit code $rc), before the trainer could catch it"
        rc=$code
    fi
    if [ "$rc" -ne "$code" ]; then
        symdiff_log "training failed with exit code $rc (not requeued)"
        return "$rc"
    fi
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "$max" ]; then
        symdiff_log "stopped by a preemption signal, but $max restarts reached: not requeueing (resubmit to go on)"
        return "$rc"
    fi
    symdiff_log "stopped by a preemption signal: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || symdiff_die "scontrol requeue $SLURM_JOB_ID failed; resubmit to resume"
    # The controller now ends this allocation; nothing more to do here.
    return 0
}
