#!/usr/bin/env bash
# Train on every GPU of this machine (or NPROC_PER_NODE CPU ranks) with torchrun.
#   examples/launch/single_node.sh --config examples/pretrain_code_mix.yaml --parallel.tensor=2
#   NPROC_PER_NODE=2 examples/launch/single_node.sh --config examples/pretrain_code_mix.yaml --model.preset=tiny \
#       --data.seq_length=256 --parallel.pipeline=2   # 2 CPU ranks
# Arguments go to `python -m megatron_code.train`; data parallel = ranks / (tensor x pipeline).
# SIGTERM or SIGUSR1 to torchrun reaches every rank, which saves at the next step and exits 0;
# torchrun waits SHUTDOWN_TIMEOUT seconds (300) for that before it kills them.
set -euo pipefail
gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
nproc=${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}
exec torchrun --standalone --nproc_per_node="$nproc" --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout="${SHUTDOWN_TIMEOUT:-300}" -m megatron_code.train "$@"
