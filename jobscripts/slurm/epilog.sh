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
RUN_DIR=$SITE_DIR/$JOB
CONF=$RUN_DIR/mpiburst_$JOB.conf
LOG=$RUN_DIR/epilog.log

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

# The server's PID and binary, read from the conf before anything else (the conf is rewritten
# by a stop); read by the user (no link followed as root, a FIFO cannot block past the timeout).
read -r PID BINARY < <(as_user timeout 10 cat -- "$CONF" 2>/dev/null | "$PYTHON" -c '
import json, sys
c = json.loads(sys.stdin.read())
pid, server = c["pid"], c["server"]
ok = type(pid) is int and pid > 0 and isinstance(server, str) and server.startswith("/") and len(server.split()) == 1
print(pid if ok else 0, server if ok else "-")' 2>/dev/null) || PID=0
[[ $PID =~ ^[0-9]+$ ]] || PID=0

if [[ $PID -gt 0 ]]; then
    policy_opt=()
    [[ -f $RUN_DIR/job.policy && ! -L $RUN_DIR/job.policy ]] && policy_opt=(-f "$RUN_DIR/job.policy")
    if logged timeout "${MPIBURST_STAGEOUT_TIMEOUT:-600}" "${MPIBURST[@]}" stage-out --id "$JOB" --dir "$RUN_DIR" \
            "${policy_opt[@]}"; then
        logged timeout 60 "${MPIBURST[@]}" stop --id "$JOB" --dir "$RUN_DIR"
    else
        note "stage-out failed; saving the tier's data in $RUN_DIR"
        logged timeout 120 "${MPIBURST[@]}" stop --save --id "$JOB" --dir "$RUN_DIR"
    fi
    # Never leave a server behind; but kill only the job's server: a process of the job's user,
    # running the server binary, in the run directory. And kill it as the user.
    if [[ -e /proc/$PID && $(stat -c %u "/proc/$PID" 2>/dev/null) == "$USER_ID" \
            && $(readlink -f "/proc/$PID/exe" 2>/dev/null) == "$(readlink -f -- "$BINARY")" \
            && $(readlink -f "/proc/$PID/cwd" 2>/dev/null) == "$(readlink -f -- "$RUN_DIR")" ]]; then
        note "server $PID still running after stop: killing it"
        as_user kill -KILL "$PID" 2>/dev/null
    fi
fi
exit 0
