"""mpi4py's own MPI-IO tests, fetched at test time (never kept in this repository).

mpi4py's source distribution on PyPI carries its test suite; its
``test/test_io.py`` runs every MPI-IO call over several array backends,
among them host memory behind ``__cuda_array_interface__`` and DLPack.
:func:`tests_dir` downloads the pinned release once with pip (hash-checked),
unpacks its ``test/`` folder into a cache directory and returns it; later
runs need no network. ``tests/upstream_io.py`` runs ``test_io.py`` against
``mpiburst.File``; ``tests/test_parity_upstream.py`` launches it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

#: The mpi4py release whose tests are run: the first whose test_io.py loops over GPU-interface backends
#: (``FakeGPUArrayBasic``, ``FakeGPUArrayNumPy`` in arrayimpl.py) that is also the installed mpi4py.
VERSION = "4.1.2"
#: sha256 of ``mpi4py-4.1.2.tar.gz`` as PyPI serves it (pip refuses anything else).
SHA256 = "56860286dc45f20e8821e93cb06669e30462348bf866f685553fa4b712d58d02"
#: The files of its test/ folder that test_io.py needs (with the licence they come under).
FILES = ("test_io.py", "arrayimpl.py", "dlpackimpl.py", "mpiunittest.py", "mpitestutil.py")


def cache_dir() -> Path:
    """Where the unpacked tests live: ``$MPIBURST_UPSTREAM_TESTS``, else ``~/.cache/mpiburst/mpi4py-VERSION-test``."""
    if os.environ.get("MPIBURST_UPSTREAM_TESTS"):
        return Path(os.environ["MPIBURST_UPSTREAM_TESTS"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mpiburst" / f"mpi4py-{VERSION}-test"


def tests_dir(timeout: float = 240) -> tuple[Path | None, str]:
    """Return ``(folder holding test_io.py, "")``, downloading it once; ``(None, reason)`` when it cannot be had.

    The reason is one line naming what is missing.
    """
    target = cache_dir()
    if all((target / name).is_file() for name in FILES):
        return target, ""
    with tempfile.TemporaryDirectory(prefix="mpiburst-upstream-") as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"mpi4py=={VERSION} --hash=sha256:{SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", "mpi4py",
               "--require-hashes", "-r", str(req), "-d", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"mpi4py {VERSION}'s sdist (its test/test_io.py) could not be downloaded from PyPI " \
                         f"in {timeout:.0f} s; with network access the test fetches it once into {target}"
        sdist = Path(tmp) / f"mpi4py-{VERSION}.tar.gz"
        if done.returncode != 0 or not sdist.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return None, f"mpi4py {VERSION}'s sdist (its test/test_io.py) could not be downloaded from PyPI " \
                         f"(pip: {last}); with network access the test fetches it once into {target}"
        unpacked = Path(tmp) / "test"
        unpacked.mkdir()
        with tarfile.open(sdist) as tar:
            for name in (*(f"test/{f}" for f in FILES), "LICENSE.rst"):
                member = tar.extractfile(f"mpi4py-{VERSION}/{name}")
                assert member is not None, name
                (unpacked / Path(name).name).write_bytes(member.read())
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(unpacked, target)      # atomic: a concurrent run sees all of it or none
        except OSError:
            if not all((target / name).is_file() for name in FILES):
                shutil.rmtree(target, ignore_errors=True)
                os.rename(unpacked, target)
    return target, ""
