#!/usr/bin/env bash
# The README's first command: bootstrap / reuse the venv, then run the MPI demo
# (examples/demo.py) on 4 ranks; the tier is started and stopped automatically.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=$("$repo/scripts/bootstrap-venv.sh")
bin=$(dirname "$python")
mpiexec=${MPIEXEC:-$bin/mpiexec}
[[ -x $mpiexec ]] || mpiexec=$(command -v mpiexec)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$bin:$PATH"
exec timeout "${MPIBURST_DEMO_TIMEOUT:-600}" "$mpiexec" -n "${NRANKS:-4}" "$python" -m mpi4py "$repo/examples/demo.py"
