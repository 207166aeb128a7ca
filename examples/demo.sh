#!/usr/bin/env bash
# The README's first command: bootstrap / reuse the venv, then run the MPI demo
# (examples/demo.py) on 4 ranks; the tier is started and stopped automatically.
#
# The backing filesystem (BFS), from MPIBURST_DEMO_BFS:
#   auto (default)  a loopback GlusterFS volume (scripts/dfs.sh) when run as root
#                   with GlusterFS installed, else the local disk ($TMPDIR)
#   gluster         the GlusterFS volume (as root; scripts/dfs.sh installs
#                   glusterfs-server with apt-get if it is missing)
#   local           the local disk
#   /some/dir       that directory (e.g. on your Lustre, GPFS or NFS)
# A volume the demo brings up is taken down at the end; one already up is left.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=$("$repo/scripts/bootstrap-venv.sh")
bin=$(dirname "$python")
mpiexec=${MPIEXEC:-$bin/mpiexec}
[[ -x $mpiexec ]] || mpiexec=$(command -v mpiexec)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$bin:$PATH"

dfs=$repo/scripts/dfs.sh
want=${MPIBURST_DEMO_BFS:-auto}
if [[ $want == auto ]]; then
    want=local
    [[ $(id -u) -eq 0 && -f $dfs ]] && command -v glusterd >/dev/null && want=gluster
fi
args=()
case $want in
    local) args=(--bfs "${TMPDIR:-/tmp}" --bfs-name "local disk, through the page cache") ;;
    gluster)
        [[ $(id -u) -eq 0 ]] || { echo "demo.sh: a GlusterFS BFS needs root; run as root or with MPIBURST_DEMO_BFS=local" >&2; exit 2; }
        bash "$dfs" status >/dev/null 2>&1 && was_up=1 || was_up=0
        mnt=$(bash "$dfs" up)
        ((was_up)) || trap 'bash "$dfs" down >/dev/null 2>&1 || echo "demo.sh: could not take the GlusterFS volume down: bash $dfs down" >&2' EXIT
        args=(--bfs "$mnt" --bfs-name "GlusterFS, a network filesystem: loopback volume, FUSE client") ;;
    *)
        [[ -d $want ]] || { echo "demo.sh: MPIBURST_DEMO_BFS=$want: not auto, gluster, local or a directory" >&2; exit 2; }
        args=(--bfs "$want") ;;
esac
timeout "${MPIBURST_DEMO_TIMEOUT:-600}" "$mpiexec" -n "${NRANKS:-4}" "$python" -m mpi4py "$repo/examples/demo.py" "${args[@]}"
