#!/bin/bash
# Slurm Prolog (slurm.conf: Prolog=/path/prolog.sh, PrologFlags=Alloc): start
# the job's tier on its first node before the job runs, as the job's user.
#
# The tier's files go to $MPIBURST_SITE_DIR/<jobid> (default /tmp/mpiburst);
# the job finds it with MPIBURST_CONF (exported by task_prolog.sh), or with
# 'mpiburst run --dir $MPIBURST_SITE_DIR/$SLURM_JOB_ID', which then joins it.
# Site settings may live in /etc/mpiburst/site.sh (sourced when present):
#   MPIBURST_SITE_DIR, MPIBURST_BFS_ROOT (default: the user's home),
#   MPIBURST_CAPACITY (default 50%), MPIBURST_PYTHON.
# A prolog that fails drains the node: this one always exits 0 and logs
# problems to the job's run directory (prolog.log).
[[ -f ${MPIBURST_SITE_CONF:-/etc/mpiburst/site.sh} ]] && . "${MPIBURST_SITE_CONF:-/etc/mpiburst/site.sh}"
SITE_DIR=${MPIBURST_SITE_DIR:-/tmp/mpiburst}
JOB=${SLURM_JOB_ID:?prolog.sh: SLURM_JOB_ID is not set}
USER_NAME=${SLURM_JOB_USER:-$(id -un)}
BFS_ROOT=${MPIBURST_BFS_ROOT:-$(getent passwd "$USER_NAME" | cut -d: -f6)}
MPIBURST="${MPIBURST_PYTHON:+$MPIBURST_PYTHON -m }mpiburst"
RUN_DIR=$SITE_DIR/$JOB

as_user() {
    if [[ $(id -u) -eq 0 && $USER_NAME != root ]]; then runuser -u "$USER_NAME" -- "$@"; else "$@"; fi
}

install -d -m 0755 "$SITE_DIR"
install -d -m 0700 -o "$USER_NAME" "$RUN_DIR"
# shellcheck disable=SC2086
as_user timeout 120 $MPIBURST start --id "$JOB" --dir "$RUN_DIR" --bfs-root "$BFS_ROOT" \
    --capacity "${MPIBURST_CAPACITY:-50%}" --channels "${SLURM_NTASKS:-${SLURM_JOB_CPUS_PER_NODE:-1}}" \
    >>"$RUN_DIR/prolog.log" 2>&1 || echo "prolog: mpiburst start failed for job $JOB" >>"$RUN_DIR/prolog.log"
exit 0
