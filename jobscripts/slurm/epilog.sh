#!/bin/bash
# Slurm Epilog (slurm.conf: Epilog=/path/epilog.sh): after the job, stage the
# tier's data out and stop it, whatever state the job left it in.
#
# 1. stage-out (SYNC every file, or the policy in $RUN_DIR/job.policy), bounded by
#    MPIBURST_STAGEOUT_TIMEOUT seconds (default 600);
# 2. stop the server: if stage-out failed, with --save (the data stays in
#    $RUN_DIR/redis_<jobid>.rdb for 'mpiburst stage-out --id <jobid> --dir $RUN_DIR');
# 3. cleanup that cannot leave a server running: if the server's PID (from the
#    run's conf file) still runs the server binary, SIGKILL it.
# Always exits 0 (a failing epilog drains the node); everything is logged to
# $RUN_DIR/epilog.log. Site settings as in prolog.sh.
[[ -f ${MPIBURST_SITE_CONF:-/etc/mpiburst/site.sh} ]] && . "${MPIBURST_SITE_CONF:-/etc/mpiburst/site.sh}"
SITE_DIR=${MPIBURST_SITE_DIR:-/tmp/mpiburst}
JOB=${SLURM_JOB_ID:?epilog.sh: SLURM_JOB_ID is not set}
USER_NAME=${SLURM_JOB_USER:-$(id -un)}
MPIBURST="${MPIBURST_PYTHON:+$MPIBURST_PYTHON -m }mpiburst"
PYTHON=${MPIBURST_PYTHON:-python3}
RUN_DIR=$SITE_DIR/$JOB
CONF=$RUN_DIR/mpiburst_$JOB.conf
[[ -d $RUN_DIR ]] || exit 0
LOG=$RUN_DIR/epilog.log

as_user() {
    if [[ $(id -u) -eq 0 && $USER_NAME != root ]]; then runuser -u "$USER_NAME" -- "$@"; else "$@"; fi
}

# The server's PID and binary, read from the conf before anything else (the
# conf is rewritten by a stop).
read -r PID BINARY < <("$PYTHON" -c 'import json, sys; c = json.load(open(sys.argv[1])); print(c["pid"] or 0, c["server"])' "$CONF" 2>/dev/null) || PID=0

if [[ $PID -gt 0 ]]; then
    policy_opt=()
    [[ -f $RUN_DIR/job.policy ]] && policy_opt=(-f "$RUN_DIR/job.policy")
    # shellcheck disable=SC2086
    if as_user timeout "${MPIBURST_STAGEOUT_TIMEOUT:-600}" $MPIBURST stage-out --id "$JOB" --dir "$RUN_DIR" \
            "${policy_opt[@]}" >>"$LOG" 2>&1; then
        as_user timeout 60 $MPIBURST stop --id "$JOB" --dir "$RUN_DIR" >>"$LOG" 2>&1
    else
        echo "epilog: stage-out failed; saving the tier's data in $RUN_DIR" >>"$LOG"
        as_user timeout 120 $MPIBURST stop --save --id "$JOB" --dir "$RUN_DIR" >>"$LOG" 2>&1
    fi
    # Never leave a server behind: the PID must be gone, or still be our server binary to be killed.
    if [[ -e /proc/$PID && $(readlink -f "/proc/$PID/exe" 2>/dev/null) == "$(readlink -f "$BINARY")" ]]; then
        echo "epilog: server $PID still running after stop: killing it" >>"$LOG"
        kill -KILL "$PID" 2>/dev/null
    fi
fi
exit 0
