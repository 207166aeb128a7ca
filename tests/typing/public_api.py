"""What a user's mypy sees of mpiburst's public names: checked by .ci/lint, never run.

``mpiburst`` loads its names on first use (a module ``__getattr__``); its
``TYPE_CHECKING`` imports give type checkers the real ones. .ci/lint runs
mypy with ``--warn-unused-ignores`` on this file: each wrong call below
carries ``# type: ignore[code]``, which is unused (an error) if the name it
calls reads as ``Any``; each ``assert_type`` fails if a type is not the one
named.
"""

from __future__ import annotations

from typing import assert_type

from mpi4py import MPI

import mpiburst
from mpiburst import File, FlushReport, Tier

f = mpiburst.File.Open(MPI.COMM_WORLD, "burst://out.dat", MPI.MODE_CREATE | MPI.MODE_WRONLY)
assert_type(f, File | MPI.File)
mpiburst.File.Open(MPI.COMM_WORLD, 42)  # type: ignore[arg-type]
mpiburst.File.Open("burst://out.dat")  # type: ignore[call-arg, arg-type]

assert_type(mpiburst.sync("burst://out.dat"), FlushReport)
assert_type(mpiburst.sync("burst://out.dat", block=False), FlushReport | None)
mpiburst.sync(3.5)  # type: ignore[call-overload]
assert_type(mpiburst.commit(), list[FlushReport])
assert_type(mpiburst.Tier.current(), Tier)
assert_type(mpiburst.prestage("burst://in.dat"), int)
assert_type(mpiburst.purge("burst://in.dat"), int)
mpiburst.pin(path=1)  # type: ignore[arg-type]
assert_type(mpiburst.listdir("burst://"), list[str])
assert_type(mpiburst.open("burst://out.dat", "wb").write(b"x"), int)

try:
    pass
except mpiburst.TierConnectionError as exc:
    assert_type(exc, mpiburst.TierConnectionError)
assert issubclass(mpiburst.NodeLostError, mpiburst.TierConnectionError)
