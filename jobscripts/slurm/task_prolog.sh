#!/bin/bash
# Slurm TaskProlog (slurm.conf: TaskProlog=/path/task_prolog.sh): hand the
# tier started by prolog.sh to the job's tasks. Slurm adds the printed
# 'export NAME=value' lines to each task's environment.
[[ -f ${MPIBURST_SITE_CONF:-/etc/mpiburst/site.sh} ]] && . "${MPIBURST_SITE_CONF:-/etc/mpiburst/site.sh}"
RUN_DIR=${MPIBURST_SITE_DIR:-/tmp/mpiburst}/$SLURM_JOB_ID
if [[ -f $RUN_DIR/mpiburst_$SLURM_JOB_ID.conf ]]; then
    echo "export MPIBURST_CONF=$RUN_DIR/mpiburst_$SLURM_JOB_ID.conf"
    echo "export MPIBURST_ID=$SLURM_JOB_ID"
fi
