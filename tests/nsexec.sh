#!/bin/bash
# MPICH hydra's -launcher-exec for the simulated hosts of tests/netns.py, in place of ssh:
#
#   nsexec.sh [ssh options] HOST COMMAND...
#
# runs COMMAND (joined into one shell line, as ssh does) on simulated host HOST
# (127.77.0.N): in network namespace ${MPIBURST_TEST_NETNS}hN with its own
# hostname hN (unshare --uts), and MPIBURST_NODE_ADDRESS=HOST, the address its
# peers reach it on. Root only, like the namespaces.
while [[ ${1:-} == -* ]]; do
    case $1 in -[bcDEeFIiJLlmOoPpQRSWw]) shift 2 ;; *) shift ;; esac
done
host=${1:?nsexec.sh: no host}
shift
n=${host##*.}
export MPIBURST_NODE_ADDRESS=$host
exec ip netns exec "${MPIBURST_TEST_NETNS:?nsexec.sh: MPIBURST_TEST_NETNS is not set}h$n" \
    unshare --uts sh -c 'hostname "$0" && exec sh -c "$*"' "h$n" "$@"
