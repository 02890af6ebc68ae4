#!/bin/bash
# OpenMPI's mpirun: ranks come from mpi4py; rank 0 picks a free port and broadcasts it.
#   NP=16 HOSTFILE=hosts cluster/mpirun.sh recalibrate recipes/paper/smollm_360m.yaml
# (-x is OpenMPI's way to pass the environment; with MPICH use mpiexec -genvlist PATH,LD_LIBRARY_PATH.)
# Ranks on other hosts get only what -x names: the paths, and every NCCL_*, GLOO_*, HF_*, TORCH_*,
# TORCHINDUCTOR_*, TORCHDYNAMO_*, PYTORCH_*, TRITON_*, DS_*, MASTER_ADDR, MASTER_PORT, PYTHONPATH,
# OMP_NUM_THREADS and CUDA_DEVICE_MAX_CONNECTIONS set
# here (not CUDA_VISIBLE_DEVICES: this host's GPU list would bind every other host to it). --bind-to none: OpenMPI
# would otherwise pin each rank (and its data-loading and offload threads) to one core.
set -euo pipefail
HOSTS=()
if [ -n "${HOSTFILE:-}" ]; then HOSTS=(--hostfile "$HOSTFILE"); fi
FORWARD=(-x PATH -x LD_LIBRARY_PATH)
for name in $(compgen -e | grep -E '^(NCCL_|GLOO_|HF_|TORCH_|TORCHINDUCTOR_|TORCHDYNAMO_|PYTORCH_|TRITON_|DS_|MASTER_(ADDR|PORT)$|PYTHONPATH$|OMP_NUM_THREADS$|CUDA_DEVICE_MAX_CONNECTIONS$)' || true); do
  FORWARD+=(-x "$name")
done
exec mpirun -np "${NP:-2}" --bind-to none ${HOSTS[@]+"${HOSTS[@]}"} "${FORWARD[@]}" \
  "${PYTHON:-python}" -m drope_megatron.cli "$@"
