#!/bin/bash
# DeepSpeed's launcher with a hostfile ("node0 slots=8" per line): it sets RANK/LOCAL_RANK/
# WORLD_SIZE/MASTER_ADDR for every process, which drope_megatron.distributed reads. It reaches
# every host of the hostfile over passwordless ssh (pdsh with several hosts), so both must work.
#   HOSTFILE=cluster/hostfile.example cluster/deepspeed-hostfile.sh recalibrate recipes/paper/llama2_7b.yaml
# Without HOSTFILE: one node, NUM_GPUS processes (default: every GPU).
set -euo pipefail
ARGS=()
# No HOSTFILE: none at all (DeepSpeed would otherwise take /job/hostfile when a machine has one).
# A HOSTFILE that is not there: DeepSpeed would only warn, and run on this node alone.
if [ -n "${HOSTFILE:-}" ] && [ ! -r "$HOSTFILE" ]; then
  echo "deepspeed-hostfile.sh: HOSTFILE=$HOSTFILE is not a readable file: name the hostfile (see hostfile.example)" >&2
  exit 2
fi
if [ -n "${HOSTFILE:-}" ]; then ARGS+=(--hostfile "$HOSTFILE"); else ARGS+=(--hostfile /dev/null); fi
# DeepSpeed's --num_gpus drops CUDA_VISIBLE_DEVICES and counts from GPU 0 (another user's, on a shared node).
if [ -n "${NUM_GPUS:-}" ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  echo "deepspeed-hostfile.sh: NUM_GPUS with CUDA_VISIBLE_DEVICES: DeepSpeed would ignore CUDA_VISIBLE_DEVICES;" \
    "list just the GPUs to use in CUDA_VISIBLE_DEVICES and unset NUM_GPUS" >&2
  exit 2
fi
if [ -n "${NUM_GPUS:-}" ]; then ARGS+=(--num_gpus "$NUM_GPUS"); fi
exec deepspeed ${ARGS[@]+"${ARGS[@]}"} --master_port "${MASTER_PORT:-29500}" --no_local_rank \
  --module drope_megatron.cli "$@"
