#!/bin/bash
# DeepSpeed's launcher with a hostfile ("node0 slots=8" per line): it sets RANK/LOCAL_RANK/
# WORLD_SIZE/MASTER_ADDR for every process, which drope_megatron.distributed reads.
#   HOSTFILE=cluster/hostfile.example cluster/deepspeed-hostfile.sh recipes/paper/llama2_7b.yaml
set -euo pipefail
exec deepspeed --hostfile "${HOSTFILE:-cluster/hostfile.example}" --master_port "${MASTER_PORT:-29500}" --no_local_rank \
  --module drope_megatron.cli recalibrate "$@"
