#!/usr/bin/env bash
# Run a command of the README as a newcomer on a machine with only Python 3.
#
#   sudo bash scripts/bare-machine.sh [COMMIT] [-- COMMAND...]     (default: HEAD, bash tests/run.sh)
#
# Simulates the fresh machine of the README's quick start on a machine that has
# the test tools installed, without uninstalling anything:
# 1. in a private mount namespace (unshare -m), every program the packages of
#    tests/system-packages.txt install under /usr/bin and /usr/sbin (redis-server,
#    h5dump, strace, sbatch, munged, setfacl, chattr, gluster, chromium, ...,
#    found with dpkg -L) is hidden by an overlay whiteout: absent, not just
#    unexecutable; the GlusterFS and Slurm state of this machine is hidden too;
# 2. as a new non-root user (mpbnewcomer, removed at the end), with an empty
#    environment and no pip cache, in a fresh `git clone` of COMMIT in that
#    user's home, it runs COMMAND and prints how long it took.
# Needs root, unshare, overlayfs, useradd and dpkg. Takes as long as COMMAND
# plus the venv's install from PyPI (under a minute). It is not part of the
# suite; see docs/ci.md.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
user=mpbnewcomer
commit=HEAD
if [[ $# -gt 0 && $1 != -- ]]; then commit=$1; shift; fi
[[ ${1:-} == -- ]] && shift
command=("$@")
((${#command[@]})) || command=(bash tests/run.sh)

[[ $(id -u) -eq 0 ]] || { echo "bare-machine.sh: run it as root (it hides programs in a mount namespace and adds a user)" >&2; exit 2; }
for tool in unshare useradd userdel dpkg git; do
    command -v "$tool" >/dev/null || { echo "bare-machine.sh: needs $tool" >&2; exit 2; }
done
sha=$(git -C "$repo" rev-parse --verify "$commit^{commit}")

# The programs of the listed packages (and of the packages that own the listed tools) under bin and sbin.
mapfile -t packages < <(sed 's/#.*//' "$repo/tests/system-packages.txt" | awk 'NF {print $1}')
while read -r _ tools; do
    for tool in $tools; do
        path=$(command -v "$tool" 2>/dev/null) || continue
        path=$(readlink -f "$path")
        packages+=("$( (dpkg -S "$path" || dpkg -S "${path#/usr}") 2>/dev/null | head -1 | cut -d: -f1)")
    done
done < <(sed 's/#.*//' "$repo/tests/system-packages.txt" | awk 'NF')
hidden=$(mktemp -d /tmp/bare-machine.XXXXXX)
trap 'rm -rf "$hidden"' EXIT
mkdir -p "$hidden"/{bin,sbin}/{upper,work}
# Essential packages (util-linux: unshare, and setpriv, which this script needs) are on every Debian
# machine, fresh ones too: they stay.
mapfile -t packages < <(for package in $(printf '%s\n' "${packages[@]}" | awk 'NF' | sort -u); do
    [[ $(dpkg-query -W -f='${Essential}' "$package" 2>/dev/null) == yes ]] || echo "$package"
done)
for package in "${packages[@]}"; do
    dpkg -L "$package" 2>/dev/null | sed -nE 's#^(/usr)?/(s?bin)/([^/]+)$#\2 \3#p'
done | sort -u | while read -r dir name; do
    mknod "$hidden/$dir/upper/$name" c 0 0       # an overlay whiteout: the name does not exist
done
echo "bare-machine.sh: hiding $(find "$hidden" -type c | wc -l) programs of: $(printf '%s\n' "${packages[@]}" | awk 'NF' | sort -u | tr '\n' ' ')" >&2

created=
if ! id "$user" >/dev/null 2>&1; then
    useradd --create-home --shell /bin/bash "$user"
    created=1
fi
home=$(getent passwd "$user" | cut -d: -f6)
cleanup() {
    local left
    left=$(pgrep -u "$user" -r R,S,D,T,t || true)   # live processes the run left behind (servers, ranks): a bug
    if [[ -n $left ]]; then
        echo "bare-machine.sh: processes left running by $user: $(ps -o pid=,args= -p "${left//$'\n'/,}" | head -5)" >&2
        for pid in $left; do kill -KILL "$pid" 2>/dev/null || true; done
    fi
    left=$(find /tmp -maxdepth 1 -user "$user" ! -name "pytest-of-$user" 2>/dev/null || true)
    [[ -z $left ]] || echo "bare-machine.sh: left in /tmp by $user (removed): ${left//$'\n'/ }" >&2
    find /tmp -maxdepth 1 -user "$user" -exec rm -rf {} + 2>/dev/null || true   # and pytest's tmp dirs
    if [[ -n $created ]]; then userdel --remove "$user" 2>/dev/null || true; fi
    rm -rf "$hidden"
}
trap cleanup EXIT
checkout=$home/mpiburst
rm -rf "$checkout"
git clone --quiet --no-hardlinks "$repo" "$checkout"
git -C "$checkout" checkout --quiet "$sha"
chown -R "$user:" "$checkout"

echo "bare-machine.sh: as $user in a fresh clone of $sha: ${command[*]}" >&2
start=$(date +%s)
set +e
unshare --mount --propagation private bash -s -- "$hidden" "$user" "$home" "$checkout" "${command[@]}" <<'EOF'
set -euo pipefail
hidden=$1 user=$2 home=$3 checkout=$4; shift 4
for dir in bin sbin; do
    mount -t overlay overlay -o "lowerdir=/usr/$dir,upperdir=$hidden/$dir/upper,workdir=$hidden/$dir/work" "/usr/$dir"
done
# This machine's GlusterFS volume and Slurm state are not on a fresh machine.
for state in /tmp/mpiburst-dfs /tmp/mpiburst-slurm /tmp/mpiburst-slurm.users; do
    [[ -e $state ]] && mount -t tmpfs -o size=1m,mode=0755 tmpfs "$state"
done
cd "$checkout"
exec setpriv --reuid="$user" --regid="$user" --init-groups --reset-env \
    env HOME="$home" USER="$user" LOGNAME="$user" PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 "$@"
EOF
rc=$?
set -e
echo "bare-machine.sh: exit $rc after $(($(date +%s) - start)) s" >&2
exit "$rc"
