#!/bin/bash
# Plain multi-node torchrun: run this on every node with its NODE_RANK (0..NNODES-1).
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=0 cluster/torchrun-multinode.sh recipes/paper/smollm_360m.yaml
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=1 cluster/torchrun-multinode.sh recipes/paper/smollm_360m.yaml
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR to node 0's address}" "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}"
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "${NPROC_PER_NODE:-8}" \
  --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}" \
  -m drope_megatron.cli recalibrate "$@"
