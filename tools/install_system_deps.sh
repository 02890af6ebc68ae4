#!/usr/bin/env bash
# System packages the Python environment needs: an MPI runtime and headers (mpi4py builds
# against them; the mpirun launcher uses them). Installs only what is missing.
set -euo pipefail
if command -v mpicc >/dev/null && command -v mpirun >/dev/null; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if command -v apt-get >/dev/null; then
  echo "installing OpenMPI (openmpi-bin libopenmpi-dev) for mpi4py" >&2
  $SUDO apt-get install -y -q openmpi-bin libopenmpi-dev >/dev/null 2>&1 || {
    $SUDO apt-get update -q >/dev/null
    $SUDO apt-get install -y -q openmpi-bin libopenmpi-dev >/dev/null
  }
else
  echo "install_system_deps: no apt-get here; install an MPI implementation (OpenMPI or MPICH with mpicc) and rerun" >&2
  exit 1
fi
