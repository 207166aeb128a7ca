#!/usr/bin/env bash
# A loopback GlusterFS volume: a real network filesystem on one machine, to
# use as mpiburst's backing filesystem (BFS) in benchmarks and tests.
#
#   scripts/dfs.sh up       start it (if needed) and print its mount point
#   scripts/dfs.sh status   print the mount point and settings; exit 1 if not up
#   scripts/dfs.sh down     unmount and stop it, removing its data
#
# Run as root. `up` installs Debian's glusterfs-server and glusterfs-client
# with apt-get when they are missing, starts one glusterd and DFS_NBRICKS
# brick daemons listening on DFS_ADDR only, creates a distribute volume and
# mounts it with the FUSE client at $DFS_ROOT/mnt. `up` on a healthy volume
# only prints the mount point; a dead FUSE mount ("Transport endpoint is not
# connected") is unmounted and mounted again. stdout is only the mount point,
# so `bfs=$(scripts/dfs.sh up)` works; progress and errors go to stderr.
#
# There is one glusterd per machine and others may be using the volume:
# `down` refuses while files on it are open (umount says busy). A caller
# that wants to leave things as it found them runs `status` first and calls
# `down` only if the volume was not up before (as .ci/run does).
#
# Settings (environment; the volume keeps the ones it was created with):
#   DFS_ROOT          state, bricks, logs and mount point  (/tmp/mpiburst-dfs)
#   DFS_ADDR          loopback address of every daemon     (127.0.0.2; the gluster
#                     CLI refuses bricks on 127.0.0.1 / localhost)
#   DFS_VOL           volume name                          (dfsvol)
#   DFS_NBRICKS       bricks; each file lives whole on one (2)
#   DFS_WRITE_BEHIND  on | off: off makes every write() a synchronous round trip (on)
#   DFS_DELAY_US      microseconds the bricks sleep in each WRITE, FSYNC and
#                     CREATE (Gluster's delay-gen), to act like a remote server (0)
set -euo pipefail

ROOT=${DFS_ROOT:-/tmp/mpiburst-dfs}
ADDR=${DFS_ADDR:-127.0.0.2}
VOL=${DFS_VOL:-dfsvol}
NBRICKS=${DFS_NBRICKS:-2}
MNT=$ROOT/mnt
LOG=$ROOT/log
PIDFILE=$ROOT/run/glusterd.pid
G="gluster --mode=script"
PACKAGES=(glusterfs-server glusterfs-client)

die() { echo "dfs.sh: $*" >&2; exit 1; }
say() { echo "dfs.sh: $*" >&2; }

usage() { die "usage: $0 up|down|status (as root; settings in the DFS_* environment variables, see the script's header)"; }

# --- checks -----------------------------------------------------------------

check_settings() {
    case ${DFS_WRITE_BEHIND:-on} in on|off) ;; *) die "DFS_WRITE_BEHIND must be on or off (got '$DFS_WRITE_BEHIND')." ;; esac
    [[ ${DFS_DELAY_US:-0} =~ ^[0-9]+$ ]] || die "DFS_DELAY_US must be a whole number of microseconds (got '$DFS_DELAY_US')."
    [[ $NBRICKS =~ ^[1-9][0-9]*$ ]] || die "DFS_NBRICKS must be a positive whole number (got '$NBRICKS')."
    [[ $ADDR == 127.* && $ADDR != 127.0.0.1 ]] || die "DFS_ADDR must be a loopback address other than 127.0.0.1 (got '$ADDR'); gluster refuses bricks on 127.0.0.1."
}

installed() { # every package in "install ok installed" state
    local p
    for p in "${PACKAGES[@]}"; do
        [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] || return 1
    done
}

install_packages() {
    installed && return 0
    command -v apt-get >/dev/null || die "${PACKAGES[*]} are not installed and there is no apt-get; install GlusterFS (server and FUSE client) and retry."
    mkdir -p "$LOG"
    say "installing ${PACKAGES[*]} with apt-get (log: $LOG/apt.log)"
    # Wait for another apt/dpkg (e.g. an install already running) rather than failing on its lock.
    local apt=(apt-get -q -y -o DPkg::Lock::Timeout=600 --no-install-recommends)
    export DEBIAN_FRONTEND=noninteractive
    if ! "${apt[@]}" install "${PACKAGES[@]}" >>"$LOG/apt.log" 2>&1; then
        "${apt[@]}" update >>"$LOG/apt.log" 2>&1 || true
        "${apt[@]}" install "${PACKAGES[@]}" >>"$LOG/apt.log" 2>&1 \
            || die "could not install ${PACKAGES[*]} with apt-get (see $LOG/apt.log); install them and retry."
    fi
    installed || die "${PACKAGES[*]} are still not installed after apt-get (see $LOG/apt.log)."
}

# --- state ------------------------------------------------------------------

alive() { # a process that runs: a zombie (left when its parent was killed; PID 1 here reaps no orphans) is gone
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) && [[ -n $state && $state != Z ]]
}

glusterd_pid() { # our glusterd's pid, if it runs
    local pid
    [[ -f $PIDFILE ]] && pid=$(cat "$PIDFILE") && [[ -n $pid ]] && alive "$pid" && echo "$pid"
}

mounted() { grep -qs " $MNT fuse.glusterfs " /proc/mounts; }

mount_works() { # the FUSE mount answers and takes a write
    local probe=$MNT/.dfs-probe.$$
    timeout 20 touch "$probe" 2>/dev/null && timeout 20 rm -f "$probe" 2>/dev/null
}

mount_dead() { # a FUSE client that is gone: "Transport endpoint is not connected"
    mounted && ! timeout 20 stat -f "$MNT" >/dev/null 2>&1
}

wait_mount_works() { # a live client reconnects to a restarted brick within a few seconds
    local i
    for i in $(seq 100); do mount_works && return 0; sleep 0.2; done
    return 1
}

volume_option() { $G volume get "$VOL" "$1" 2>/dev/null | awk -v k="$1" '$1 == k {print $2}'; }

describe() {
    local wb delay
    wb=$(volume_option performance.write-behind)
    delay=0
    [[ $(volume_option delay-gen.enable) == *WRITE* ]] && delay=$(volume_option delay-gen.delay-duration)
    echo "volume $VOL on $ADDR ($NBRICKS-brick distribute), write-behind ${wb:-?}, delay ${delay:-?} us, mounted at $MNT"
}

# Refuse to hand out a volume whose settings differ from the ones asked for explicitly.
check_same_settings() {
    local got
    if [[ -n ${DFS_WRITE_BEHIND:-} ]]; then
        got=$(volume_option performance.write-behind)
        [[ $got == "$DFS_WRITE_BEHIND" ]] \
            || die "the volume is up with write-behind $got, not $DFS_WRITE_BEHIND; run 'dfs.sh down' first (make sure no one else uses it)."
    fi
    if [[ -n ${DFS_DELAY_US:-} ]]; then
        got=0
        [[ $(volume_option delay-gen.enable) == *WRITE* ]] && got=$(volume_option delay-gen.delay-duration)
        [[ $got == "$DFS_DELAY_US" ]] \
            || die "the volume is up with a delay of $got us, not $DFS_DELAY_US; run 'dfs.sh down' first (make sure no one else uses it)."
    fi
}

# --- up ---------------------------------------------------------------------

start_glusterd() {
    mkdir -p "$ROOT/glusterd" "$ROOT/run" "$LOG"
    cat >"$ROOT/glusterd.vol" <<EOF
volume management
    type mgmt/glusterd
    option working-directory $ROOT/glusterd
    option transport-type socket
    option transport.socket.bind-address $ADDR
    option transport.socket.listen-port 24007
    option transport.socket.keepalive-time 10
    option transport.socket.keepalive-interval 2
    option transport.socket.read-fail-log off
    option ping-timeout 0
    option event-threads 1
    option max-port 60999
end-volume
EOF
    glusterd -f "$ROOT/glusterd.vol" -p "$PIDFILE" -l "$LOG/glusterd.log" 9>&- \
        || die "glusterd did not start (see $LOG/glusterd.log)."
    local i
    for i in $(seq 100); do $G pool list >/dev/null 2>&1 && return 0; sleep 0.1; done
    die "glusterd does not answer after 10 s (see $LOG/glusterd.log)."
}

create_volume() {
    local i bricks=() wb=${DFS_WRITE_BEHIND:-on} delay=${DFS_DELAY_US:-0}
    for i in $(seq "$NBRICKS"); do mkdir -p "$ROOT/brick$i"; bricks+=("$ADDR:$ROOT/brick$i"); done
    # 'force': the bricks are directories of the root filesystem.
    $G volume create "$VOL" transport tcp "${bricks[@]}" force >/dev/null
    $G volume set "$VOL" performance.write-behind "$wb" >/dev/null
    if ((delay > 0)); then # delay-gen goes in above posix; it must be set before the volume starts
        $G volume set "$VOL" debug.delay-gen posix >/dev/null
        $G volume set "$VOL" delay-gen.enable WRITE,FSYNC,CREATE >/dev/null
        $G volume set "$VOL" delay-gen.delay-percentage 100 >/dev/null
        $G volume set "$VOL" delay-gen.delay-duration "$delay" >/dev/null
    fi
}

mount_volume() {
    mkdir -p "$MNT"
    mount -t glusterfs -o log-file="$LOG/client.log" "$ADDR:/$VOL" "$MNT" 9>&- \
        || die "mounting $ADDR:/$VOL at $MNT failed (see $LOG/client.log)."
    wait_mount_works || die "the volume is mounted at $MNT but does not take writes (see $LOG/client.log)."
    chmod 1777 "$MNT" # a scratch filesystem, like /tmp: every user may make a directory
}

up() {
    check_settings
    [[ -e /dev/fuse ]] || die "/dev/fuse is missing: this machine (or container) cannot mount FUSE filesystems."
    install_packages
    if [[ -z $(glusterd_pid) ]]; then
        local other
        other=$(pgrep -x -r R,S,D,T glusterd | head -1 || true)   # running, sleeping, in I/O or stopped: not a zombie
        if [[ -n $other ]]; then
            die "a glusterd not started by dfs.sh runs (pid $other); there is one per machine: stop it, or use its volumes."
        fi
        mounted && umount -l "$MNT" 2>/dev/null || true # a client of a previous, dead server
        clean_state
        say "starting glusterd on $ADDR"
        start_glusterd
    fi
    $G volume info "$VOL" >/dev/null 2>&1 || { say "creating volume $VOL ($NBRICKS bricks in $ROOT)"; create_volume; }
    check_same_settings
    # Starts the volume, or restarts any brick daemon that died; a no-op on a healthy volume.
    $G volume start "$VOL" force >/dev/null || die "'gluster volume start $VOL' failed (see $LOG/glusterd.log)."
    if mount_dead; then
        say "the FUSE mount at $MNT is dead; mounting again"
        umount -l "$MNT"
    fi
    if mounted; then
        wait_mount_works || die "the volume is mounted at $MNT but does not take writes (see $LOG/client.log)."
    else
        mount_volume
    fi
    say "$(describe)"
    echo "$MNT"
}

# --- down -------------------------------------------------------------------

clean_state() { # what a dead glusterd left: orphaned brick daemons, state, brick logs
    local f
    for f in /var/run/gluster/vols/"$VOL"/*.pid; do
        [[ -f $f ]] && kill "$(cat "$f")" 2>/dev/null || true
    done
    rm -rf "$ROOT"/brick* "$ROOT/glusterd" "$ROOT/run" "$ROOT/glusterd.vol" "/var/run/gluster/vols/$VOL"
    rm -f /var/log/glusterfs/bricks/"$(echo "${ROOT#/}" | tr / -)"-brick*.log
}

down() {
    if mount_dead; then
        umount -l "$MNT" # nothing can be using a dead FUSE mount
    elif mounted; then
        umount "$MNT" 2>/dev/null \
            || die "$MNT is in use (open files or a process's working directory: 'fuser -vm $MNT' shows them); stop those first."
    fi
    local pid
    pid=$(glusterd_pid || true)
    if [[ -n $pid ]]; then
        $G volume stop "$VOL" force >/dev/null 2>&1 || true # stops the brick daemons
        $G volume delete "$VOL" >/dev/null 2>&1 || true
        kill "$pid"
        local i
        for i in $(seq 50); do alive "$pid" || break; sleep 0.1; done
    fi
    clean_state
    rmdir "$MNT" 2>/dev/null || true
    say "volume $VOL is down"
}

# --- status -----------------------------------------------------------------

status() {
    [[ -n $(glusterd_pid) ]] || { say "down (no glusterd started by dfs.sh)"; return 1; }
    mounted || { say "glusterd runs but $MNT is not mounted; run 'dfs.sh up'"; return 1; }
    ! mount_dead || { say "the FUSE mount at $MNT is dead; run 'dfs.sh up'"; return 1; }
    mount_works || { say "the volume mounted at $MNT does not take writes; run 'dfs.sh up'"; return 1; }
    say "up: $(describe)"
    echo "$MNT"
}

# ---------------------------------------------------------------------------

[[ $# -eq 1 ]] || usage
case $1 in up|down|status) ;; *) usage ;; esac
[[ $(id -u) -eq 0 ]] || die "must run as root (GlusterFS daemons and the FUSE mount need it); run it with sudo."
# One dfs.sh at a time on this machine: two 'up's racing would start two servers.
# The daemons it starts must not inherit the lock's descriptor (9>&- where they start).
mkdir -p "$(dirname "$ROOT")"
exec 9>"$ROOT.lock"
flock -w 600 9 || die "another dfs.sh has held $ROOT.lock for 10 minutes; is it stuck?"
"$1"
