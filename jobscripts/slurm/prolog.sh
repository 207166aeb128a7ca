#!/bin/bash
# Slurm Prolog (slurm.conf: Prolog=/path/prolog.sh, PrologFlags=Alloc): start
# the job's tier before the job runs, as the job's user. Slurm runs it on every
# node of the job.
#
# One node: the tier's files go to $MPIBURST_SITE_DIR/<jobid> (default /tmp/mpiburst).
# Several nodes, with MPIBURST_SHARED_DIR set (a directory every node sees at the
# same path): each node starts its own server in $MPIBURST_SHARED_DIR/<jobid>
# ('mpiburst start --nodes N --node K'), and node 0's prolog joins them into one
# cluster once every node's server is up (each waits at most MPIBURST_JOIN_TIMEOUT
# seconds, default 60, for the others). Several nodes without MPIBURST_SHARED_DIR:
# the job's first node starts a one-node tier, the others nothing.
# The job finds the tier with MPIBURST_CONF (exported by task_prolog.sh), or with
# 'mpiburst run --dir <run directory>', which then joins it.
# Site settings may live in /etc/mpiburst/site.sh (sourced when present):
#   MPIBURST_SITE_DIR, MPIBURST_SHARED_DIR, MPIBURST_BFS_ROOT (default: the user's
#   home), MPIBURST_CAPACITY (default 50%, per node), MPIBURST_PYTHON, MPIBURST_SERVER
#   (several nodes need a server with TLS, e.g. Debian's redis-server, unless
#   MPIBURST_TRUST_NETWORK=1 says the network is private to the job; docs/security.md),
#   MPIBURST_NODE_ADDRESS (the address this node's peers reach it on; default: its host name's).
#
# Root touches no path the job's user can change: the site directory must be
# root's own (not a symlink, writable by root only), the run directory is made
# there with mkdir (exclusive) and only then handed to the user, and everything
# written into it, the log included, is written by the user's own processes.
# A prolog that fails drains the node: this one always exits 0; problems go to
# the job's run directory (prolog.log) or, before it exists, to stderr (slurmd's log).
[[ -f ${MPIBURST_SITE_CONF:-/etc/mpiburst/site.sh} ]] && . "${MPIBURST_SITE_CONF:-/etc/mpiburst/site.sh}"
SITE_DIR=${MPIBURST_SITE_DIR:-/tmp/mpiburst}
JOB=${SLURM_JOB_ID:?prolog.sh: SLURM_JOB_ID is not set}
USER_NAME=${SLURM_JOB_USER:-$(id -un)}
BFS_ROOT=${MPIBURST_BFS_ROOT:-$(getent passwd "$USER_NAME" | cut -d: -f6)}
if [[ -n ${MPIBURST_PYTHON:-} ]]; then MPIBURST=("$MPIBURST_PYTHON" -m mpiburst); else MPIBURST=(mpiburst); fi
. "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/site_nodes.sh"    # NODES, NODE, ONE_HOST, RUN_DIR
(( NODES == 1 && NODE != 0 )) && exit 0     # a one-node tier, on the job's first node only
LOG=$RUN_DIR/prolog.log
(( NODES > 1 )) && LOG=$RUN_DIR/prolog@$NODE.log

say() { echo "mpiburst prolog: job $JOB: $*" >&2; }
as_user() {
    if [[ $(id -u) -eq 0 && $USER_NAME != root ]]; then runuser -u "$USER_NAME" -- "$@"; else "$@"; fi
}
# Run a command as the user with its output appended to the run's log, opened by the user's shell.
logged() { as_user bash -c 'log=$1; shift; "$@" >>"$log" 2>&1' logged "$LOG" "$@"; }

if [[ ! $JOB =~ ^[A-Za-z0-9._-]+$ || $JOB == . || $JOB == .. ]]; then
    say "the job ID is not usable as a directory name; not starting the tier"; exit 0
fi
USER_ID=$(id -u "$USER_NAME" 2>/dev/null) || { say "no user $USER_NAME; not starting the tier"; exit 0; }
# The site (or shared) directory: made here if missing (mkdir does not follow a planted symlink), else it
# must be root's.
PARENT=$(dirname -- "$RUN_DIR")
mkdir -m 0755 "$PARENT" 2>/dev/null
read -r owner mode kind < <(stat -c '%u %a %F' -- "$PARENT" 2>/dev/null)
if [[ $kind != directory || $owner != "$(id -u)" || $(( 8#${mode:-777} & 8#022 )) -ne 0 ]]; then
    say "site directory $PARENT is not a directory of $(id -un) writable by it alone; not starting the tier"; exit 0
fi
# The run directory: created exclusively (a requeued job finds its own), then handed to the user. Of a
# multi-node job, by node 0's prolog; the others wait (bounded) until it is the user's.
run_dir_ok() {
    read -r owner kind < <(stat -c '%u %F' -- "$RUN_DIR" 2>/dev/null)
    [[ $kind == directory && $owner == "$USER_ID" ]]
}
if (( NODE == 0 )) && mkdir -m 0700 "$RUN_DIR" 2>/dev/null; then
    chown -h "$USER_NAME:" "$RUN_DIR"
fi
for (( waited = 0; NODE > 0 && waited < $JOIN_TIMEOUT * 5; waited++ )); do
    run_dir_ok && break
    sleep 0.2
done
if ! run_dir_ok; then
    say "run directory $RUN_DIR is not a directory of $USER_NAME; not starting the tier"; exit 0
fi
start_opts=(--id "$JOB" --dir "$RUN_DIR" --bfs-root "$BFS_ROOT" --capacity "${MPIBURST_CAPACITY:-50%}"
            --channels "${SLURM_NTASKS:-${SLURM_JOB_CPUS_PER_NODE:-1}}")
if (( NODES > 1 )); then
    start_opts+=(--nodes "$NODES" --node "$NODE" --join-timeout "$JOIN_TIMEOUT")
    # simulated nodes: the cluster bus stays on loopback, unless the site says where each node listens
    (( ONE_HOST )) && [[ -z ${MPIBURST_NODE_ADDRESS:-} ]] && start_opts+=(--bind 127.0.0.1)
fi
logged timeout $(( 120 + $JOIN_TIMEOUT )) "${MPIBURST[@]}" start "${start_opts[@]}" \
    || logged echo "prolog: mpiburst start failed for job $JOB on node $NODE of $NODES"
exit 0
