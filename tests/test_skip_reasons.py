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


def test_no_cuda_device_is_a_skip_even_where_ci_requires_every_tool(monkeypatch):
    """A GPU is hardware, not a Debian package .ci/run could install: the GPU tests skip in CI too (docs/ci.md)."""
    from conftest import require_cuda_device
    from mpiburst import cuda

    monkeypatch.setenv("MPIBURST_REQUIRE_TOOLS", "1")
    monkeypatch.setattr(cuda, "runtime", lambda: None)
    with pytest.raises(pytest.skip.Exception) as skipped:
        require_cuda_device()
    reason = str(skipped.value)
    assert "\n" not in reason and reason.startswith("no CUDA device here")


def test_mpi4py_tests_that_cannot_be_downloaded_say_what_is_missing_in_one_line(tmp_path, monkeypatch):
    """Without PyPI the upstream parity test is skipped naming mpi4py's sdist (and fails under CI's setting)."""
    import upstream

    monkeypatch.setenv("MPIBURST_UPSTREAM_TESTS", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")                 # as on a machine without network
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    folder, reason = upstream.tests_dir(timeout=120)
    assert folder is None and "\n" not in reason
    assert f"mpi4py {upstream.VERSION}'s sdist" in reason and "PyPI" in reason
