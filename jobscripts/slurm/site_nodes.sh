# Sourced by prolog.sh, epilog.sh and task_prolog.sh: which node of the job this is, and the run directory.
#
# Sets NODES (the job's node count: $MPIBURST_NODES, else the hosts of $SLURM_JOB_NODELIST), NODE (this
# node's index: $MPIBURST_NODE_INDEX, else the position of $SLURMD_NODENAME in that list), ONE_HOST (1 when
# every node is this host: simulated nodes, whose servers then listen on loopback only), JOIN_TIMEOUT
# ($MPIBURST_JOIN_TIMEOUT, default 60 s: how long the nodes wait for each other) and RUN_DIR.
# A job of several nodes gets one server per node, joined into one cluster, when the site has a directory
# every node sees at the same path (MPIBURST_SHARED_DIR): RUN_DIR is $MPIBURST_SHARED_DIR/<jobid> there.
# Without it, only the job's first node (NODE 0) starts a tier, a one-node one in $MPIBURST_SITE_DIR.
# Expects SITE_DIR and JOB to be set.
_hosts=()
[[ -n ${SLURM_JOB_NODELIST:-} ]] && mapfile -t _hosts < <(timeout 10 scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null)
NODES=${MPIBURST_NODES:-${#_hosts[@]}}
[[ $NODES =~ ^[0-9]+$ && $NODES -ge 1 ]] || NODES=1
NODE=${MPIBURST_NODE_INDEX:-}
if [[ -z $NODE ]]; then
    NODE=0
    for _i in "${!_hosts[@]}"; do [[ ${_hosts[$_i]} == "${SLURMD_NODENAME:-$(hostname -s)}" ]] && NODE=$_i; done
fi
[[ $NODE =~ ^[0-9]+$ && $NODE -lt $NODES ]] || NODE=0
ONE_HOST=0
(( $(printf '%s\n' "${_hosts[@]}" | sort -u | grep -c .) <= 1 )) && ONE_HOST=1
JOIN_TIMEOUT=${MPIBURST_JOIN_TIMEOUT:-60}
[[ $JOIN_TIMEOUT =~ ^[0-9]+$ ]] || JOIN_TIMEOUT=60
SHARED_DIR=${MPIBURST_SHARED_DIR:-}
if (( NODES > 1 )) && [[ -n $SHARED_DIR ]]; then
    RUN_DIR=$SHARED_DIR/$JOB
else
    NODES=1
    RUN_DIR=$SITE_DIR/$JOB
fi
unset _hosts _i
