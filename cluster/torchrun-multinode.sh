#!/bin/bash
# Multi-node torchrun without a scheduler: run this on every node. The nodes meet by c10d
# rendezvous at MASTER_ADDR:MASTER_PORT (node ranks are assigned there, as in the Slurm template).
#   MASTER_ADDR=node0 NNODES=2 cluster/torchrun-multinode.sh recalibrate recipes/paper/smollm_360m.yaml
# Any drope command runs this way (pretrain, recalibrate, eval --tp N, convert verify).
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR to the first node address}" "${NNODES:?set NNODES to the number of nodes}"
exec torchrun --nnodes "$NNODES" --nproc-per-node "${NPROC_PER_NODE:-8}" --max-restarts "${MAX_RESTARTS:-0}" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "${RDZV_ID:-drope}" \
  -m drope_megatron.cli "$@"
