"""Simulated hosts for the multi-host tests: network namespaces joined by a bridge, each with its own hostname.

``Hosts(n)`` makes hosts ``h1`` .. ``hn``: network namespaces
``mpb<pid>h<k>`` with address ``127.77.0.<k>/24`` on a veth pair whose other
end is a port of bridge ``br0`` in a separate "switch" namespace
``mpb<pid>sw``; ``route_localnet`` lets 127.0.0.0/8 addresses cross the
veths. The root namespace cannot reach that network, and nothing leaves it.
Processes run on host ``k`` under ``ip netns exec`` with ``unshare --uts``
and hostname ``h<k>`` (MPI and mpiburst group ranks by host name), and
with ``MPIBURST_NODE_ADDRESS=127.77.0.<k>``. :meth:`Hosts.mpiexec` launches
MPI across them with MPICH's hydra, ``-launcher ssh -launcher-exec
tests/nsexec.sh``, and ``UCX_TLS=self,tcp`` (by default UCX sees one
machine and uses shared memory across the namespaces).

Root only. Namespaces of an earlier run whose process is gone are removed
first, so a killed test session leaves nothing that breaks the next.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Sequence

NSEXEC = Path(__file__).resolve().parent / "nsexec.sh"
SUBNET = "127.77.0"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def remove_stale() -> None:
    """Remove the namespaces of multi-host test sessions whose process is gone."""
    for name in _namespaces():
        found = re.fullmatch(r"mpb(\d+)(h\d+|sw)", name)
        if found and not os.path.exists(f"/proc/{found.group(1)}"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


class Hosts:
    """``count`` simulated hosts ``h1`` .. ``h<count>`` on one bridge (see the module's docstring)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.prefix = f"mpb{os.getpid()}"

    def address(self, k: int) -> str:
        """The address of host ``k`` (1-based)."""
        return f"{SUBNET}.{k}"

    def up(self) -> "Hosts":
        """Make the switch and the hosts (after removing any left from an earlier session)."""
        remove_stale()
        self.down()
        switch = f"{self.prefix}sw"
        _ip("netns", "add", switch)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        for k in range(1, self.count + 1):
            ns = f"{self.prefix}h{k}"
            _ip("netns", "add", ns)
            _ip("link", "add", f"v{k}", "netns", ns, "type", "veth", "peer", "name", f"p{k}", "netns", switch)
            _ip("-n", switch, "link", "set", f"p{k}", "master", "br0")
            _ip("-n", switch, "link", "set", f"p{k}", "up")
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1",
                            f"net.ipv4.conf.v{k}.route_localnet=1"], check=True, capture_output=True, timeout=30)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(k)}/24", "dev", f"v{k}")
            _ip("-n", ns, "link", "set", f"v{k}", "up")
        return self

    def down(self) -> None:
        """Remove this session's namespaces (their veths and bridge go with them)."""
        for name in _namespaces():
            if name.startswith(self.prefix):
                subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)

    def env(self, k: int, base: dict | None = None, **extra: str) -> dict:
        """The environment of a process on host ``k``."""
        env = dict(os.environ if base is None else base)
        env.update(MPIBURST_TEST_NETNS=self.prefix, MPIBURST_NODE_ADDRESS=self.address(k), UCX_TLS="self,tcp", **extra)
        return env

    def argv(self, k: int, command: Sequence[str]) -> list[str]:
        """The command line that runs ``command`` on host ``k`` with its own hostname."""
        return ["ip", "netns", "exec", f"{self.prefix}h{k}", "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', f"h{k}", *command]

    def run(self, k: int, command: Sequence[str], env: dict, timeout: float, cwd: str | Path | None = None,
            ) -> subprocess.CompletedProcess:
        """Run ``command`` on host ``k`` and return its completed process (output captured as text)."""
        return subprocess.run(self.argv(k, command), env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)

    def popen(self, k: int, command: Sequence[str], env: dict, cwd: str | Path | None = None) -> subprocess.Popen:
        """Start ``command`` on host ``k`` (output captured as text)."""
        return subprocess.Popen(self.argv(k, command), env=env, cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def mpiexec_argv(self, per_host: int, hosts: int | None = None) -> list[str]:
        """The ``mpiexec`` command line (to run on host 1) that starts ``per_host`` ranks on each of ``hosts`` hosts.

        ``-genvnone``: each rank keeps its own host's environment (its
        ``MPIBURST_NODE_ADDRESS``), which nsexec.sh passes on from mpiexec's.
        """
        hosts = hosts or self.count
        mpiexec = str(Path(sys.executable).parent / "mpiexec")
        spec = ",".join(f"{self.address(k)}:{per_host}" for k in range(1, hosts + 1))
        return [mpiexec, "-genvnone", "-launcher", "ssh", "-launcher-exec", str(NSEXEC), "-localhost",
                self.address(1), "-hosts", spec, "-n", str(per_host * hosts)]
