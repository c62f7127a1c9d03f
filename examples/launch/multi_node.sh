#!/usr/bin/env bash
# Train on several machines: run this same command on every node (any order). The nodes meet at
# MASTER_ADDR:MASTER_PORT (any one of them) through torchrun's c10d rendezvous; node ranks are
# assigned there.
#   MASTER_ADDR=node01 NNODES=4 examples/launch/multi_node.sh --config examples/recipes/ma_code.yaml \
#       --parallel.tensor=8 --parallel.pipeline=2
# Environment: NNODES (required), MASTER_ADDR (required), MASTER_PORT (29500), NPROC_PER_NODE
# (the node's GPU count), RUN_ID (rendezvous id; one per job, default "megatron_code"),
# SHUTDOWN_TIMEOUT (300: how long torchrun lets the ranks save after a SIGTERM or SIGUSR1, e.g.
# Kubernetes' pre-emption, before it kills them; keep the pod's terminationGracePeriodSeconds above it).
set -euo pipefail
: "${NNODES:?set NNODES to the number of machines}"
: "${MASTER_ADDR:?set MASTER_ADDR to the host name of one of the machines}"
gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
nproc=${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}
exec torchrun --nnodes="$NNODES" --nproc_per_node="$nproc" --rdzv_backend=c10d \
    --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id="${RUN_ID:-megatron_code}" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout="${SHUTDOWN_TIMEOUT:-300}" \
    -m megatron_code.train "$@"
