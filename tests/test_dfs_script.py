"""``scripts/dfs.sh``: the loopback GlusterFS volume the benchmark and CI use.

There is one GlusterFS server per machine and others may be using the volume,
so these tests never take down a volume that was up before them: they check
what ``up`` on a running volume does (print the mount point, change nothing),
that ``status`` agrees, and the one-line refusals. A volume these tests bring
up themselves is taken down at the end. Needs root (skipped otherwise; a
failure under ``MPIBURST_REQUIRE_TOOLS=1``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import Iterator

import pytest
from conftest import REPO, require_root

from mpiburst.bench.main import filesystem

SCRIPT = str(REPO / "scripts" / "dfs.sh")
PIDFILE = "/tmp/mpiburst-dfs/run/glusterd.pid"   # under the default DFS_ROOT


def dfs(*args: str, env: dict[str, str] | None = None, timeout: float = 900,
        user: str | None = None, script: str = SCRIPT) -> subprocess.CompletedProcess:
    """Run ``dfs.sh *args`` (as ``user`` via util-linux setpriv, essential on Debian) with only the given DFS_* settings."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("DFS_")}
    cmd = [script, *args]
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, env=base | (env or {}), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def volume() -> Iterator[str]:
    """The volume's mount point: up before (left up), or brought up here (taken down at the end)."""
    require_root("dfs.sh runs GlusterFS daemons and a FUSE mount")
    was_up = dfs("status").returncode == 0
    up = dfs("up")
    assert up.returncode == 0, up.stderr
    yield up.stdout.strip()
    if not was_up:
        down = dfs("down")
        assert down.returncode == 0, down.stderr


@pytest.mark.timeout(900)
def test_up_on_a_running_volume_prints_its_mount_point_and_changes_nothing(volume):
    assert filesystem(volume)["type"] == "fuse.glusterfs"
    pid = open(PIDFILE).read().strip()
    again = dfs("up")
    assert again.returncode == 0, again.stderr
    assert again.stdout == volume + "\n"                    # stdout is only the mount point
    assert "starting" not in again.stderr and "creating" not in again.stderr
    assert open(PIDFILE).read().strip() == pid
    status = dfs("status")
    assert status.returncode == 0 and status.stdout == volume + "\n"
    assert "write-behind" in status.stderr


@pytest.mark.timeout(120)
def test_up_refuses_other_settings_than_the_running_volume_has(volume):
    got = dfs("status").stderr
    other = "off" if "write-behind on" in got else "on"
    result = dfs("up", env={"DFS_WRITE_BEHIND": other})
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "run 'dfs.sh down' first" in result.stderr
    bad = dfs("up", env={"DFS_DELAY_US": "soon"})
    assert bad.returncode == 1 and "DFS_DELAY_US must be a whole number" in bad.stderr


@pytest.mark.timeout(60)
def test_one_line_errors_for_a_wrong_command_or_a_user_who_is_not_root():
    require_root("setpriv to another user")
    usage = dfs("sideways")
    assert usage.returncode == 1 and usage.stderr.startswith("dfs.sh: usage:") and usage.stderr.count("\n") == 1
    # A copy another user can reach: the checkout may sit in a private directory (a mktemp -d clone).
    with tempfile.TemporaryDirectory(dir="/tmp") as reachable:
        os.chmod(reachable, 0o755)
        copy = shutil.copy(SCRIPT, os.path.join(reachable, "dfs.sh"))
        os.chmod(copy, 0o755)
        nobody = dfs("up", user="65534", script=copy)
    assert nobody.returncode == 1 and nobody.stdout == ""
    assert nobody.stderr == "dfs.sh: must run as root (GlusterFS daemons and the FUSE mount need it); " \
                            "run it with sudo.\n"
