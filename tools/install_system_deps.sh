#!/usr/bin/env bash
# System packages the Python environment needs: an MPI runtime and headers (mpi4py builds
# against them; the mpirun launcher uses them) and Python's venv module (Debian and Ubuntu ship
# it apart). Installs only what is missing. Usage: install_system_deps.sh [python that will make
# the venv] (no argument: the venv exists, only MPI is checked)
set -euo pipefail
PY="${1:-}"
PACKAGES=()
if ! command -v mpicc >/dev/null || ! command -v mpirun >/dev/null; then
  PACKAGES+=(openmpi-bin libopenmpi-dev)
fi
if [ -n "$PY" ] && ! "$PY" -c "import ensurepip, venv" 2>/dev/null; then
  PACKAGES+=("python$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv")
fi
if [ ${#PACKAGES[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if command -v apt-get >/dev/null; then
  echo "installing ${PACKAGES[*]}" >&2
  $SUDO apt-get install -y -q "${PACKAGES[@]}" >/dev/null 2>&1 || {
    $SUDO apt-get update -q >/dev/null
    $SUDO apt-get install -y -q "${PACKAGES[@]}" >/dev/null
  }
else
  echo "install_system_deps: no apt-get here; install ${PACKAGES[*]} (an MPI with mpicc, Python's venv) and rerun" >&2
  exit 1
fi
