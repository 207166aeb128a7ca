"""Run mpi4py's ``test/test_io.py`` against ``mpiburst.File`` (or, with ``--plain``, against ``MPI.File``).

Usage, every rank::

    mpiexec -n 2 python -m mpi4py tests/upstream_io.py TESTS_DIR WORK_DIR [--plain]

TESTS_DIR holds mpi4py's test files (``tests/upstream.py`` fetches them),
WORK_DIR an empty folder every rank sees. The ranks start a tier (server
``$MPIBURST_SERVER`` or the usual discovery) with its BFS root in WORK_DIR;
test_io.py's ``MPI`` is then a view of mpi4py's ``MPI`` whose ``File.Open``
opens the same file name under ``burst://upstream/`` through
``mpiburst.File`` (and removes the empty temporary file test_io made, as
``MODE_DELETE_ON_CLOSE`` would). Every rank prints one line::

    upstream test_io rank R: N run, F failures, E errors, S skipped

then the failures in full; the exit status is 1 when any rank failed.
"""

from __future__ import annotations

import io
import os
import sys
import types
import unittest

from mpi4py import MPI


def main(tests_dir: str, work: str, plain: bool) -> int:
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    os.environ["TMPDIR"] = work        # test_io's temporary files (made by rank 0 of each communicator)
    sys.path.insert(0, tests_dir)
    import test_io                      # its import opens one file with MPI.File itself (have_feature)

    tier = None
    if not plain:
        import mpiburst
        from mpiburst.tier import Tier

        bfs = os.path.join(work, "bfs")
        if rank == 0:
            os.makedirs(bfs, exist_ok=True)
        comm.Barrier()
        run_id = comm.bcast(f"upstream{os.getpid()}" if rank == 0 else None)
        tier = Tier.start(comm, id=run_id, dir=work, bfs_root=bfs, capacity="256M")

        class File:
            """``MPI.File`` for test_io: its temporary file's name, opened under ``burst://upstream/``."""

            @staticmethod
            def Open(comm, filename, amode=MPI.MODE_RDONLY, info=MPI.INFO_NULL):  # noqa: N802 - MPI's name
                fh = mpiburst.File.Open(comm, f"burst://upstream/{os.path.basename(filename)}", amode, info)
                if comm.Get_rank() == 0 and amode & MPI.MODE_DELETE_ON_CLOSE:
                    os.unlink(filename)
                return fh

        view = types.ModuleType("mpi4py.MPI")
        view.__dict__.update(vars(MPI))
        view.File = File
        test_io.MPI = view
    out = io.StringIO()
    suite = unittest.defaultTestLoader.loadTestsFromModule(test_io)
    if tier is None:
        result = unittest.TextTestRunner(stream=out, verbosity=0).run(suite)
    else:
        with tier:                      # stopped by rank 0 after a barrier
            result = unittest.TextTestRunner(stream=out, verbosity=0).run(suite)
    bad = len(result.failures) + len(result.errors)
    print(f"upstream test_io rank {rank}: {result.testsRun} run, {len(result.failures)} failures, "
          f"{len(result.errors)} errors, {len(result.skipped)} skipped", flush=True)
    if bad:
        print(out.getvalue(), flush=True)
    return 1 if comm.allreduce(bad) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], "--plain" in sys.argv[3:]))
