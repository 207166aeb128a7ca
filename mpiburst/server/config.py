"""The server's hardened configuration file ``redis_<id>.conf`` and the ACL users it defines.

* The server binds to 127.0.0.1 on one node, to this host's address when the
  job spans several nodes (``--bind`` overrides), and listens on a unix socket
  in a 0700 directory. Protected mode stays on; it does not stop other users
  of the node, the ACLs below do.
* ``user default off``; ranks connect as ``mpiburst``, which can read, write,
  run scripts and INFO but not CONFIG, ACL, DEBUG, MODULE, FLUSHALL, FLUSHDB,
  SAVE, SHUTDOWN, REPLICAOF, MIGRATE, KEYS. Lifecycle operations (SAVE,
  SHUTDOWN) use a separate ``mpiburst-admin`` user, whose password only the
  lifecycle commands read; it cannot change the configuration or the ACLs
  either, so no credential reopens the network or the security settings of a
  running server. The config holds only the SHA-256 of each password.
* Paths are written quoted, so a run directory may contain spaces.
* ``save ""`` (no periodic snapshots) and explicit ``dir``, ``dbfilename``,
  ``logfile``.
* A node's server of a multi-node run (``cluster_port`` given) runs in
  cluster mode: its own state file ``nodes_<id>@<k>.conf`` (written 0600 by
  the server, which starts with umask 077), its cluster bus on
  ``cluster_port`` of the same bind address, no full-coverage requirement (a
  dead node's slots do not stop the others serving theirs). The ranks' user
  can run no CLUSTER command (not even CLUSTER INFO or SLOTS) nor MIGRATE; only
  the admin user may MEET and ADDSLOTSRANGE, to form the cluster. A run with
  replicas adds a replication user (PSYNC, REPLCONF, PING only; its password
  in the clear in every node's 0600 config as ``masterauth``), CLUSTER
  REPLICATE and FAILOVER for the admin user, and CLUSTER FAILOVER for the
  ranks' user (promoting a dead node's replica on two nodes). The cluster
  bus itself is not authenticated by Redis or Valkey: anyone who can reach
  the bus port can join the node to a cluster. So with the run's TLS files
  (:mod:`.tls`) every TCP path is mutual TLS: ``port 0`` and ``tls-port`` (no
  plaintext port at all), ``tls-cluster yes``, ``tls-replication yes``,
  ``tls-auth-clients yes``; the unix socket stays plaintext (a 0700
  directory guards it). Without them (``--trust-network``) the TCP port and
  the bus are plaintext.
"""

from __future__ import annotations

import hashlib
import os

from ..runconf import AdminCredentials, RunConf, cluster_conf_name, log_name, rdb_name
from .tls import TlsFiles

USER = "mpiburst"
ADMIN_USER = "mpiburst-admin"
#: ACL rules of the user the ranks connect as.
USER_RULES = ("~* &* -@all +@read +@write +@keyspace +@connection +@transaction +@scripting "
              "-@dangerous +info")
#: ACL rules of the admin user (lifecycle commands only): SAVE, SHUTDOWN, INFO, CONFIG GET, CLIENT LIST; nothing that
#: could reopen the network or the security settings (no CONFIG SET, ACL, MODULE, DEBUG, REPLICAOF).
ADMIN_RULES = "~* &* -@all +@connection -@dangerous +info +save +shutdown +config|get +client|list"
#: What the admin user of a cluster-mode server may add: forming the cluster and reading its state, nothing else
#: (no FORGET, RESET, SETSLOT, FAILOVER, REPLICATE, MIGRATE).
ADMIN_CLUSTER_RULES = "+cluster|meet +cluster|addslotsrange +cluster|info +cluster|myid +cluster|nodes"
#: What the admin user of a run with replicas may add: giving a primary its replica, and promoting a replica
#: when the cluster cannot (two nodes: no majority), see :mod:`.replicas`.
ADMIN_REPLICA_RULES = "+cluster|replicate +cluster|failover"
#: What the ranks' user of a run with replicas may add: promoting its node's replica when the node's server is
#: dead and the cluster has no majority to do it (two nodes; see :meth:`ClusterStore._promote
#: <mpiburst.store.cluster_store.ClusterStore._promote>`). On a primary the command fails; it touches no data.
USER_REPLICA_RULES = "+cluster|failover"
#: The user a replica authenticates as to its primary: the replication protocol only.
REPL_USER = "mpiburst-repl"
REPL_RULES = "-@all +psync +replconf +ping"
#: How long (ms) a cluster node may not answer before the others count it as failed.
CLUSTER_NODE_TIMEOUT = 5000


def _acl_hash(password: str) -> str:
    """Return the ACL form of a password: '#' + its SHA-256 in hex (the server never sees the password)."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def replication_password(admin: AdminCredentials) -> str:
    """Return the password a replica gives its primary: derived from the admin password, so no file holds a new one.

    It is in every node's 0600 config in the clear (``masterauth``: a server
    turned replica after a failover needs it too); it allows only PSYNC,
    REPLCONF and PING, which still read the whole data set: it is as secret as the data.
    """
    return hashlib.sha256(f"mpiburst-replication:{admin.password}".encode()).hexdigest()


def replication_settings(conf: RunConf, admin: AdminCredentials) -> list[str]:
    """Return the config lines of a node of a run with replicas: the replication user and its credentials, and
    replica output buffers that hold a whole tier's worth (a burst never drops a replica into a full resync)."""
    password = replication_password(admin)
    return [
        f"user {REPL_USER} on {_acl_hash(password)} {REPL_RULES}",
        f"masteruser {REPL_USER}",
        f"masterauth {quote(password)}",
        f"client-output-buffer-limit replica {max(conf.capacity, 256 << 20)} 0 0",
        "cluster-allow-replica-migration no",
    ]


def quote(value: str) -> str:
    """Return ``value`` as one double-quoted token of the server's config syntax (spaces, quotes, any byte)."""
    out = []
    for byte in os.fsencode(value):
        ch = chr(byte)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 32 <= byte < 127:
            out.append(ch)
        else:
            out.append(f"\\x{byte:02x}")
    return '"' + "".join(out) + '"'


def tls_settings(files: TlsFiles, port: int) -> list[str]:
    """Return the config lines that make ``port`` a mutual-TLS port and put the bus and replication on TLS too."""
    return [
        "port 0",
        f"tls-port {port}",
        f"tls-cert-file {quote(files.cert)}",
        f"tls-key-file {quote(files.key)}",
        f"tls-ca-cert-file {quote(files.ca)}",
        "tls-auth-clients yes",
        "tls-replication yes",
        "tls-cluster yes",
        'tls-protocols "TLSv1.2 TLSv1.3"',
    ]


def render_config(conf: RunConf, admin: AdminCredentials, bind: str, maxclients: int, member: str | None = None,
                  cluster_port: int | None = None, tls: TlsFiles | None = None) -> str:
    """Return the text of the hardened ``redis_<member>.conf`` for ``conf`` (port 0: unix socket only).

    Parameters
    ----------
    member
        The name part of the server's files (default: the run ID; ``<id>@<k>`` for node ``k``).
    cluster_port
        Run in cluster mode with the cluster bus on this port (a node of a multi-node run).
    tls
        The run's TLS files: ``conf.port`` becomes a mutual-TLS port, no plaintext TCP port is opened,
        and the cluster bus and replication use TLS.
    """
    member = member or conf.id
    cluster = [] if cluster_port is None else [
        "cluster-enabled yes",
        f"cluster-config-file {quote(os.path.join(conf.dir, cluster_conf_name(member)))}",
        f"cluster-port {cluster_port}",
        f"cluster-node-timeout {CLUSTER_NODE_TIMEOUT}",
        "cluster-require-full-coverage no",
        "cluster-allow-reads-when-down yes",
        *(replication_settings(conf, admin) if conf.replicas else []),
    ]
    admin_rules = ADMIN_RULES if cluster_port is None else f"{ADMIN_RULES} {ADMIN_CLUSTER_RULES}"
    if cluster_port is not None and conf.replicas:
        admin_rules += " " + ADMIN_REPLICA_RULES
    return "\n".join([
        f"# generated by mpiburst for run {conf.id}; holds password hashes only",
        f"bind {bind}",
        *(tls_settings(tls, conf.port) if tls else [f"port {conf.port}"]),
        "protected-mode yes",
        f"unixsocket {quote(conf.socket)}",
        "unixsocketperm 700",
        "daemonize no",
        f"dir {quote(conf.dir)}",
        f"dbfilename {quote(rdb_name(member))}",
        f"logfile {quote(os.path.join(conf.dir, log_name(member)))}",
        "loglevel notice",
        'save ""',
        "appendonly no",
        f"maxmemory {conf.capacity}",
        "maxmemory-policy noeviction",
        f"maxclients {maxclients}",
        "enable-protected-configs no",
        "enable-debug-command no",
        "enable-module-command no",
        "user default off",
        f"user {conf.user} on {_acl_hash(conf.password)} {USER_RULES}"
        + (f" {USER_REPLICA_RULES}" if cluster_port is not None and conf.replicas else ""),
        f"user {admin.user} on {_acl_hash(admin.password)} {admin_rules}",
        *cluster,
        "",
    ])
