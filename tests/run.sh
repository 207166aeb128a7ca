#!/usr/bin/env bash
# Run the whole test suite: the README's second command and what .ci/run calls.
#
#   bash tests/run.sh [extra pytest args for the serial part]
#
# 1. bootstraps / reuses the venv (scripts/bootstrap-venv.sh);
# 2. says which system packages of tests/system-packages.txt are not installed:
#    it installs nothing itself; the tests that need a missing tool are skipped,
#    each with a reason naming its package (listed at the end of the run), and
#    with MPIBURST_REQUIRE_TOOLS=1 (CI: .ci/run installs them) that is an error;
# 3. runs every test file except those named *_mpi*.py, in $MPIBURST_TEST_WORKERS
#    processes (pytest-xdist; default 4: most tests wait rather than compute);
# 4. runs every tests/*_mpi*.py under `mpiexec -n 2`, and all but the cluster
#    files (step 5 runs them at 6 ranks) under `mpiexec -n 4`, with
#    `python -m mpi4py -m pytest --with-mpi -x` (a failing rank aborts the job),
#    per-test timeouts, and an outer `timeout`;
# 5. runs every tests/*cluster*_mpi*.py once more under `mpiexec -n 6` with
#    MPIBURST_RANKS_PER_NODE=2: three simulated nodes, one server each.
# The server engine is $MPIBURST_SERVER if set, else the normal discovery order.
#
# MPIBURST_TEST_PASS=server runs the pass of a second server engine (.ci/run's
# second): only the tests marked `server` (conftest.py marks every test that
# starts or talks to a server; the memory-store and pure unit tests already ran
# with the first engine) and not `workflow` (job scripts, CLI workflows and the
# benchmark's smoke tests, whose server is only their medium), and the MPI files under -n 2 and the cluster
# files under -n 6, not -n 4 (4 ranks send the server the same commands as 2;
# what the rank count changes is the client side, already run at -n 4 with the
# first engine). See docs/ci.md for the passes and their time budget.
# MPIBURST_TEST_PARTS=serial or =mpi runs only step 3 or only steps 4-5.
# Exits non-zero on the first failing part.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=$("$repo/scripts/bootstrap-venv.sh")
bin=$(dirname "$python")
mpiexec=${MPIEXEC:-$bin/mpiexec}
[[ -x $mpiexec ]] || mpiexec=$(command -v mpiexec)
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$bin:$PATH"

missing=()
while read -r package tools; do
    for tool in $tools; do
        path=$(command -v "$tool") && [[ -x $path ]] || { missing+=("$package"); break; }
    done
done < <(sed 's/#.*//' tests/system-packages.txt | awk 'NF')
if ((${#missing[@]})); then
    echo "tests/run.sh: not installed: ${missing[*]}; the tests that need them are skipped" \
         "(to run them: apt-get install ${missing[*]}, as root)"
    if [[ ${MPIBURST_REQUIRE_TOOLS:-} == 1 ]]; then
        echo "tests/run.sh: MPIBURST_REQUIRE_TOOLS=1: every test must run; install the packages above" >&2
        exit 1
    fi
fi

engine=$("$python" -c 'from mpiburst.server import find_server; print(find_server())')
echo "tests/run.sh: server engine $engine ($("$engine" --version | head -1))"

parts=${MPIBURST_TEST_PARTS:-serial mpi}
[[ $parts =~ ^(serial mpi|serial|mpi)$ ]] || { echo "tests/run.sh: MPIBURST_TEST_PARTS must be 'serial', 'mpi' or unset, not '$parts'" >&2; exit 2; }
pass=${MPIBURST_TEST_PASS:-all}
case $pass in
    all) select=(); ranks=(2 4) ;;
    server) select=(-m "server and not workflow"); ranks=(2) ;;
    *) echo "tests/run.sh: MPIBURST_TEST_PASS must be 'all', 'server' or unset, not '$pass'" >&2; exit 2 ;;
esac

# Idle MPI ranks sleep in short naps instead of spinning (MPICH's heavy yield): with more ranks
# than cores, a spinning rank takes the CPU that the rank it waits for needs.
export MPIR_CVAR_ENABLE_HEAVY_YIELD=${MPIR_CVAR_ENABLE_HEAVY_YIELD:-1}
# A short base for pytest's temporary directories: unix socket paths in them must stay under
# 108 bytes, and /tmp/pytest-of-root/pytest-N/popen-gwK/ is long. One per run: runs may overlap.
basetemp=$(mktemp -d "${TMPDIR:-/tmp}/mpb.XXXXXX")
trap 'rm -rf "$basetemp"' EXIT

if [[ $parts == *serial* ]]; then
    # Most serial tests wait (on servers, jobs, time limits) rather than compute: run them in
    # MPIBURST_TEST_WORKERS processes (pytest-xdist; default 4), each test taken by the next free one.
    workers=${MPIBURST_TEST_WORKERS:-4}
    echo "tests/run.sh: serial tests${select:+ (${select[*]})} in $workers processes"
    timeout "${MPIBURST_SERIAL_TIMEOUT:-3600}" "$python" -m pytest -x -q -rs --timeout=300 \
        -n "$workers" --dist worksteal --basetemp="$basetemp/serial" \
        -m "not mpi${select:+ and server and not workflow}" --ignore-glob='*_mpi*' tests "$@"
fi
[[ $parts == *mpi* ]] || { echo "tests/run.sh: serial tests passed"; exit 0; }

shopt -s nullglob
mpi_files=(tests/*_mpi*.py)
cluster_files=(tests/*cluster*_mpi*.py)
for n in "${ranks[@]}"; do
    files=("${mpi_files[@]}")
    # Beyond 2 ranks the cluster files run at 6 (below), as 3 nodes: 4 ranks on one node add nothing to that.
    ((n > 2)) && files=($(printf '%s\n' "${mpi_files[@]}" | grep -v -e cluster))
    [[ ${#files[@]} -gt 0 ]] || break
    echo "tests/run.sh: MPI tests with $n ranks: ${files[*]}"
    timeout "${MPIBURST_MPI_TIMEOUT:-1800}" "$mpiexec" -n "$n" "$python" -m mpi4py -m pytest --with-mpi -x -q -rs \
        --timeout=300 --timeout-method=thread "${select[@]}" "${files[@]}"
done
if [[ ${#cluster_files[@]} -gt 0 ]]; then
    echo "tests/run.sh: MPI tests with 6 ranks as 3 nodes: ${cluster_files[*]}"
    MPIBURST_RANKS_PER_NODE=2 timeout "${MPIBURST_MPI_TIMEOUT:-1800}" "$mpiexec" -n 6 "$python" -m mpi4py -m pytest \
        --with-mpi -x -q -rs --timeout=300 --timeout-method=thread "${select[@]}" "${cluster_files[@]}"
fi
echo "tests/run.sh: all passed"
