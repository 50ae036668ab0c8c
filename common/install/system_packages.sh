#!/usr/bin/env bash
# Install the system packages the project needs when they are missing:
# Open MPI (mpicc/mpirun, for mpi4py and Horovod), a C++ compiler, Python
# headers and venv. On clusters, load your MPI module instead (module load
# openmpi) so mpi4py and Horovod build against the cluster's MPI.
set -euo pipefail

packages=()
command -v mpicc >/dev/null 2>&1 && command -v mpirun >/dev/null 2>&1 || packages+=(openmpi-bin libopenmpi-dev)
command -v g++ >/dev/null 2>&1 || packages+=(g++ make)
python3 -c "import venv, ensurepip" >/dev/null 2>&1 || packages+=(python3-venv)
python3 -c "import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" \
    || packages+=(python3-dev)

[ ${#packages[@]} -eq 0 ] && exit 0

command="apt-get install -y ${packages[*]}"
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "missing system packages: ${packages[*]}" >&2
    echo "install them as root (Debian/Ubuntu: sudo apt-get update && sudo $command)," >&2
    echo "or on a cluster load your MPI and compiler modules, then rerun make install" >&2
    exit 1
fi
echo "installing system packages: ${packages[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive $command -qq
