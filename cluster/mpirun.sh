#!/bin/bash
# OpenMPI's mpirun: ranks come from mpi4py; rank 0 picks a free port and broadcasts it.
#   NP=16 HOSTFILE=hosts cluster/mpirun.sh recalibrate recipes/paper/smollm_360m.yaml
# (-x is OpenMPI's way to pass the environment; with MPICH use mpiexec -genvlist PATH,LD_LIBRARY_PATH.)
set -euo pipefail
HOSTS=()
if [ -n "${HOSTFILE:-}" ]; then HOSTS=(--hostfile "$HOSTFILE"); fi
exec mpirun -np "${NP:-2}" ${HOSTS[@]+"${HOSTS[@]}"} -x PATH -x LD_LIBRARY_PATH \
  "${PYTHON:-python}" -m drope_megatron.cli "$@"
