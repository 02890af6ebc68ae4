#!/bin/bash
# mpirun (OpenMPI or MPICH): ranks come from mpi4py; rank 0 picks a free port and broadcasts it.
#   NP=16 HOSTFILE=hosts cluster/mpirun.sh recipes/paper/smollm_360m.yaml
set -euo pipefail
HOSTS=()
if [ -n "${HOSTFILE:-}" ]; then HOSTS=(--hostfile "$HOSTFILE"); fi
exec mpirun -np "${NP:-2}" "${HOSTS[@]}" -x PATH -x LD_LIBRARY_PATH \
  python -m drope_megatron.cli recalibrate "$@"
