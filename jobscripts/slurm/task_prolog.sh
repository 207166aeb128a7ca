#!/bin/bash
# Slurm TaskProlog (slurm.conf: TaskProlog=/path/task_prolog.sh): hand the
# tier started by prolog.sh to the job's tasks. Slurm adds the printed
# 'export NAME=value' lines to each task's environment. The run directory is
# the prolog's: $MPIBURST_SHARED_DIR/<jobid> for a tier of several nodes, else
# $MPIBURST_SITE_DIR/<jobid>.
[[ -f ${MPIBURST_SITE_CONF:-/etc/mpiburst/site.sh} ]] && . "${MPIBURST_SITE_CONF:-/etc/mpiburst/site.sh}"
SITE_DIR=${MPIBURST_SITE_DIR:-/tmp/mpiburst}
JOB=$SLURM_JOB_ID
. "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/site_nodes.sh"    # RUN_DIR
if [[ -f $RUN_DIR/mpiburst_$SLURM_JOB_ID.conf ]]; then
    echo "export MPIBURST_CONF=$RUN_DIR/mpiburst_$SLURM_JOB_ID.conf"
    echo "export MPIBURST_ID=$SLURM_JOB_ID"
fi
