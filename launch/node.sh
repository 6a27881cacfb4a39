#!/usr/bin/env bash
# One node's share of a bigscale run: derive the rendezvous, then exec torchrun, which starts this
# node's ranks (`python -m bigscale.train OVERRIDES`).
#
# Under Slurm, srun runs it once per node (see slurm/train.sbatch, which
# `bigscale train launcher=slurm ...` renders and submits):
#   srun --ntasks-per-node=1 bash launch/node.sh run_dir=/shared/runs/sft1 strategy=zero3
# By hand, on each of two nodes (`bigscale train launcher=multinode ...` runs it the same way):
#   BIGSCALE_NNODES=2 BIGSCALE_NODE_RANK=0 BIGSCALE_RDZV_ENDPOINT=node001:29500 \
#       bash launch/node.sh run_dir=/shared/runs/sft1 strategy=zero3     # on node001
#   BIGSCALE_NNODES=2 BIGSCALE_NODE_RANK=1 BIGSCALE_RDZV_ENDPOINT=node001:29500 \
#       bash launch/node.sh run_dir=/shared/runs/sft1 strategy=zero3     # on node002
# The run directory must be the same path on a filesystem every node sees.
#
# Settings come from the environment; a BIGSCALE_* value wins over what Slurm implies.
#   BIGSCALE_NNODES          nodes, or MIN:MAX for elastic   Slurm: $SLURM_NNODES
#   BIGSCALE_NODE_RANK       this node's index; node 0 hosts the rendezvous store
#                                                            Slurm: $SLURM_NODEID
#   BIGSCALE_RDZV_ENDPOINT   HOST:PORT of node 0             Slurm: the job's first host, and
#   BIGSCALE_RDZV_PORT         (Slurm only) default 20000 + job id % 10000: the same on every
#                              node, different for jobs running side by side, and below Linux's
#                              ephemeral ports (32768+) so no outgoing connection holds it
#   BIGSCALE_RDZV_ID         the same on every node          Slurm: the job id (kept on requeue)
#   BIGSCALE_NPROC_PER_NODE  ranks on this node; auto (the default) = GPU count, or 2 without GPUs
#   BIGSCALE_MAX_RESTARTS    times torchrun restarts the group after a rank fails (default 0)
#   BIGSCALE_PYTHON          the interpreter bigscale is installed in (default python3)
#   BIGSCALE_DRY_RUN=1       print the torchrun command instead of running it
# One node needs none of them: it rendezvouses on loopback.
set -euo pipefail

die() {
    echo "node.sh: error: $*" >&2
    exit 2
}

# Slurm's --signal=USR1@N, the warning before the time limit, reaches every process of the job
# step, torchrun's agent included, and Python's default action for SIGUSR1 is to exit. Ignored
# here, it stays ignored through exec in the agent; the training ranks install their own handler
# (which replaces an inherited "ignore"), save a checkpoint and requeue the job.
trap '' USR1

python="${BIGSCALE_PYTHON:-python3}"
nproc="${BIGSCALE_NPROC_PER_NODE:-auto}"
max_restarts="${BIGSCALE_MAX_RESTARTS:-0}"
endpoint="${BIGSCALE_RDZV_ENDPOINT:-}"

# The $SLURM_* variables are read here, on each node, after srun started this script. Written
# into the sbatch script instead, they would expand once on the first node, and every node would
# claim to be node 0.
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    nnodes="${BIGSCALE_NNODES:-${SLURM_NNODES:?is unset: start node.sh with srun}}"
    node_rank="${BIGSCALE_NODE_RANK:-${SLURM_NODEID:?is unset: start node.sh with srun}}"
    rdzv_id="${BIGSCALE_RDZV_ID:-$SLURM_JOB_ID}"
    port="${BIGSCALE_RDZV_PORT:-$((20000 + SLURM_JOB_ID % 10000))}"
else
    nnodes="${BIGSCALE_NNODES:-1}"
    node_rank="${BIGSCALE_NODE_RANK:-0}"
    rdzv_id="${BIGSCALE_RDZV_ID:-bigscale}"
    port="${BIGSCALE_RDZV_PORT:-}"
fi

if [[ -z "$endpoint" ]]; then
    if [[ "$nnodes" == 1 ]]; then
        # Nothing else needs to find a one-node rendezvous: loopback needs no name lookup, and
        # port 0 lets the store take any free port.
        endpoint="127.0.0.1:${BIGSCALE_RDZV_PORT:-0}"
    elif [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
        command -v scontrol >/dev/null ||
            die "scontrol not found on PATH; set BIGSCALE_RDZV_ENDPOINT=HOST:PORT (node 0)"
        hosts="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"
        endpoint="${hosts%%$'\n'*}:$port"
    else
        die "$nnodes nodes need BIGSCALE_RDZV_ENDPOINT=HOST:PORT: node 0's address and a free port"
    fi
fi

# The c10d rendezvous assigns ranks itself (torchrun ignores --node_rank for it), so the node rank
# only decides which node hosts the rendezvous store. Saying so, instead of letting torchrun guess
# from host names, keeps a node whose Slurm name differs from its hostname from waiting forever.
is_host=0
[[ "$node_rank" == 0 ]] && is_host=1

if [[ "$nproc" == auto ]]; then
    nproc="$("$python" -c 'import torch; print(torch.cuda.device_count() or 2)')" ||
        die "$python cannot import torch; set BIGSCALE_PYTHON to bigscale's interpreter"
fi

# A restarted group (BIGSCALE_MAX_RESTARTS > 0) must not meet in the store of the attempt before:
# torchrun shares one store across attempts by default, and a new rank can read a dead rank's
# address from it and wait in init_process_group for the whole collective timeout
# (pytorch#135712). Unshared, each attempt's rank 0 hosts a fresh store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"

cmd=(
    "$python" -m torch.distributed.run
    --nnodes "$nnodes"
    --nproc_per_node "$nproc"
    --rdzv_backend c10d
    --rdzv_endpoint "$endpoint"
    --rdzv_id "$rdzv_id"
    --rdzv_conf "is_host=$is_host"
    --max_restarts "$max_restarts"
    -m bigscale.train "$@"
)

if [[ "${BIGSCALE_DRY_RUN:-0}" == 1 ]]; then
    printf '%q' "${cmd[0]}"
    printf ' %q' "${cmd[@]:1}"
    printf '\n'
    exit 0
fi
echo "node.sh: node $node_rank of $nnodes on $(hostname), rendezvous $endpoint (id $rdzv_id)," \
    "$nproc rank(s)" >&2
exec "${cmd[@]}"
