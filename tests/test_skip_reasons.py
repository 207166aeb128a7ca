"""A test that cannot run on a machine with only Python says which Debian package it needs (#11).

``tests/run.sh`` on a fresh machine skips such tests with a one-line reason;
the reason must name the package of ``tests/system-packages.txt`` to install.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import system_packages


def test_the_glusterfs_benchmark_names_the_packages_of_its_volume(monkeypatch):
    import test_bench_dfs_mpi

    monkeypatch.delenv("MPIBURST_DFS", raising=False)
    monkeypatch.delenv("MPIBURST_REQUIRE_TOOLS", raising=False)   # skip, as on a newcomer's machine
    with pytest.raises(pytest.skip.Exception) as skipped:
        test_bench_dfs_mpi._volume()
    reason = str(skipped.value)
    assert "\n" not in reason
    packages = {system_packages()["glusterd"], system_packages()["mount.glusterfs"]}
    assert packages == {"glusterfs-server", "glusterfs-client"}
    assert all(package in reason for package in packages), reason


def test_a_missing_tool_is_skipped_naming_its_package(monkeypatch):
    from conftest import require_tool

    monkeypatch.delenv("MPIBURST_REQUIRE_TOOLS", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")                     # no tool at all
    for tool, package in system_packages().items():
        with pytest.raises(pytest.skip.Exception) as skipped:
            require_tool(tool)
        assert str(skipped.value) == (f"needs {tool}: install the Debian package {package} "
                                      "(see tests/system-packages.txt)")


def test_tests_needing_root_or_a_tool_say_so_through_conftest_so_ci_fails_instead():
    """A ``skipif`` on the user or a tool skips in CI too; ``require_root``/``require_tool`` fail there."""
    from conftest import REPO

    found = [f"{path.name}:{n}" for path in sorted((REPO / "tests").glob("*.py")) if path.name != Path(__file__).name
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if "skipif(" in line and ("geteuid" in line or "which(" in line)]
    assert not found, f"use conftest.require_root / require_tool instead of skipif: {found}"


def test_a_session_without_root_skips_the_slurm_tests_whatever_lock_root_left(tmp_path, monkeypatch):
    """After a root session made the machine's Slurm test lock (0600), a user's session must skip the
    Slurm tests, not fail them with EACCES on that lock (seen on the bare-machine run)."""
    import slurm_cluster
    from conftest import require_root

    require_root("running a process as another user")
    lock = tmp_path / "jobs.lock"
    lock.touch()
    lock.chmod(0o600)
    monkeypatch.setattr(slurm_cluster, "JOBS_LOCK", str(lock))
    pid = os.fork()
    if pid == 0:   # the child: user nobody, then what the autouse fixture of the Slurm test files does
        code = 1
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            with slurm_cluster.one_test_at_a_time():
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
