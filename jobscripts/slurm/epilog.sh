#!/bin/bash
# Slurm Epilog (slurm.conf: Epilog=/path/epilog.sh): after the job, stage the
# tier's data out and stop it, whatever state the job left it in.
#
# 1. stage-out (SYNC every file, or the policy in $RUN_DIR/job.policy), bounded by
#    MPIBURST_STAGEOUT_TIMEOUT seconds (default 600);
# 2. stop the server: if stage-out failed, with --save (the data stays in
#    $RUN_DIR/redis_<jobid>.rdb for 'mpiburst stage-out --id <jobid> --dir $RUN_DIR');
# 3. cleanup that cannot leave a server running: if the server's PID (from the
#    run's conf file) still runs, SIGKILL it.
# Always exits 0 (a failing epilog drains the node); everything is logged to
# $RUN_DIR/epilog.log. Site settings as in prolog.sh.
#
# A tier of several nodes (prolog.sh with MPIBURST_SHARED_DIR): node 0's epilog
# does steps 1 and 2 for the whole cluster (every node's data is staged out
# before any server stops; 'stop' stops every node's server). The epilog of
# node K > 0 reads its own server's PID from the node's entry file, waits until
# node 0's epilog has stopped it (at most the stage-out timeout plus 180 s, less
# once the run's conf is gone), then does step 3 on its node. Logs: epilog@K.log.
# With replicas (MPIBURST_REPLICAS=1) each node also hosts the previous node's
# replica (its PID in the entry file too): it counts as the node's server for
# the wait (promoted, it may hold a lost node's data until node 0's stop) and
# for step 3.
#
# Root acts on nothing the job's user controls without checking it: every file
# of the run directory is opened by the user's own processes (the conf is read
# by 'cat' as the user under a timeout, the log is appended by the user's
# shell), and step 3 kills only a process of the job's user running the
# server binary in the run directory, and kills it as that user.
[[ -f ${MPIBURST_SITE_CONF:-/etc/mpiburst/site.sh} ]] && . "${MPIBURST_SITE_CONF:-/etc/mpiburst/site.sh}"
SITE_DIR=${MPIBURST_SITE_DIR:-/tmp/mpiburst}
JOB=${SLURM_JOB_ID:?epilog.sh: SLURM_JOB_ID is not set}
USER_NAME=${SLURM_JOB_USER:-$(id -un)}
if [[ -n ${MPIBURST_PYTHON:-} ]]; then MPIBURST=("$MPIBURST_PYTHON" -m mpiburst); else MPIBURST=(mpiburst); fi
PYTHON=${MPIBURST_PYTHON:-python3}
STAGEOUT_TIMEOUT=${MPIBURST_STAGEOUT_TIMEOUT:-600}
[[ $STAGEOUT_TIMEOUT =~ ^[0-9]+$ ]] || STAGEOUT_TIMEOUT=600
. "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/site_nodes.sh"    # NODES, NODE, RUN_DIR
(( NODES == 1 && NODE != 0 )) && exit 0     # a one-node tier runs on the job's first node only
CONF=$RUN_DIR/mpiburst_$JOB.conf
LOG=$RUN_DIR/epilog.log
SOURCE=$CONF                                # where this node's server PID is written
if (( NODES > 1 )); then
    LOG=$RUN_DIR/epilog@$NODE.log
    (( NODE > 0 )) && SOURCE=$RUN_DIR/mpiburst_$JOB@$NODE.node
fi

as_user() {
    if [[ $(id -u) -eq 0 && $USER_NAME != root ]]; then runuser -u "$USER_NAME" -- "$@"; else "$@"; fi
}
# Run a command as the user with its output appended to the run's log, opened by the user's shell.
logged() { as_user bash -c 'log=$1; shift; "$@" >>"$log" 2>&1' logged "$LOG" "$@"; }
note() { logged echo "epilog: $*"; }

[[ $JOB =~ ^[A-Za-z0-9._-]+$ && $JOB != . && $JOB != .. ]] || exit 0
USER_ID=$(id -u "$USER_NAME" 2>/dev/null) || exit 0
read -r owner kind < <(stat -c '%u %F' -- "$RUN_DIR" 2>/dev/null)
[[ $kind == directory && $owner == "$USER_ID" ]] || exit 0   # not a symlink, the job user's: else not ours

# The server's PID and binary, read from the conf (or the node's entry) before anything else (a stop
# rewrites or removes it); read by the user (no link followed as root, a FIFO cannot block past the timeout).
read -r PID BINARY < <(as_user timeout 10 cat -- "$SOURCE" 2>/dev/null | "$PYTHON" -c '
import json, sys
c = json.loads(sys.stdin.read())
pid, server = c["pid"], c["server"]
ok = type(pid) is int and pid > 0 and isinstance(server, str) and server.startswith("/") and len(server.split()) == 1
print(pid if ok else 0, server if ok else "-")' 2>/dev/null) || PID=0
[[ $PID =~ ^[0-9]+$ ]] || PID=0
# The replica this node hosts (a run with replicas), from its entry file, read the same way.
REPLICA=0
if (( NODES > 1 )); then
    REPLICA=$(as_user timeout 10 cat -- "$RUN_DIR/mpiburst_$JOB@$NODE.node" 2>/dev/null | "$PYTHON" -c '
import json, sys
pid = (json.loads(sys.stdin.read()).get("replica_here") or {}).get("pid")
print(pid if type(pid) is int and pid > 0 else 0)' 2>/dev/null) || REPLICA=0
    [[ $REPLICA =~ ^[0-9]+$ ]] || REPLICA=0
fi

# The job's server (PID $1): a process of the job's user, running the server binary, in the run directory.
is_server() {
    [[ $1 -gt 0 && -e /proc/$1 && $(stat -c %u "/proc/$1" 2>/dev/null) == "$USER_ID" \
        && $(readlink -f "/proc/$1/exe" 2>/dev/null) == "$(readlink -f -- "$BINARY")" \
        && $(readlink -f "/proc/$1/cwd" 2>/dev/null) == "$(readlink -f -- "$RUN_DIR")" ]]
}

if [[ $PID -gt 0 && $NODE -gt 0 ]]; then
    # Node 0's epilog stages every node's data out, then stops every server: wait for it, bounded.
    limit=$(( $(date +%s) + $STAGEOUT_TIMEOUT + 180 ))
    while { is_server "$PID" || is_server "$REPLICA"; } && (( $(date +%s) < limit )); do
        [[ -e $CONF ]] || { sleep 2; break; }     # node 0's stop is over (it removed the conf)
        sleep 1
    done
elif [[ $PID -gt 0 ]]; then
    policy_opt=()
    [[ -f $RUN_DIR/job.policy && ! -L $RUN_DIR/job.policy ]] && policy_opt=(-f "$RUN_DIR/job.policy")
    if logged timeout "$STAGEOUT_TIMEOUT" "${MPIBURST[@]}" stage-out --id "$JOB" --dir "$RUN_DIR" \
            "${policy_opt[@]}"; then
        logged timeout 60 "${MPIBURST[@]}" stop --id "$JOB" --dir "$RUN_DIR"
    else
        note "stage-out failed; saving the tier's data in $RUN_DIR"
        logged timeout 120 "${MPIBURST[@]}" stop --save --id "$JOB" --dir "$RUN_DIR"
    fi
fi
# Never leave a server behind; but kill only the job's servers (is_server), and kill them as the user.
if [[ $PID -gt 0 ]] && is_server "$PID"; then
    note "server $PID still running after stop: killing it"
    as_user kill -KILL "$PID" 2>/dev/null
fi
if [[ $PID -gt 0 ]] && is_server "$REPLICA"; then
    note "replica $REPLICA still running after stop: killing it"
    as_user kill -KILL "$REPLICA" 2>/dev/null
fi
exit 0
