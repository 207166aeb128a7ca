"""Analyse a simulation's HDF5 output through the burst tier, flushed or not.

With a run going (``$MPIBURST_CONF`` set, or ``mpiburst_<id>.conf`` here):

    python examples/h5_analysis.py burst://sim.h5

prints, for every dataset of the file, its shape, dtype, min, mean and max,
and the file's attributes. ``mpiburst.h5.File`` reads the tier's bytes where
it has them (the newest) and the BFS file's elsewhere, so it works on output
still being written by a job, before any flush.

Without a run, ``--demo DIR`` starts a tier in DIR, writes a small
simulation's output through it (nothing is flushed), analyses it, and stops.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from mpiburst import h5 as mh5
from mpiburst.errors import MpiburstError


def summarise(name: str) -> None:
    """Print the attributes and per-dataset statistics of HDF5 file ``name`` of the tier."""
    with mh5.File(name, "r") as f:
        print(f"{f.filename}: attributes {dict(f.attrs)}")

        def visit(path: str, obj) -> None:
            if isinstance(obj, mh5.h5py.Dataset) and obj.dtype.kind in "biuf" and obj.size:
                data = obj[()]
                print(f"  {path:24s} {str(obj.shape):14s} {str(obj.dtype):8s} "
                      f"min {data.min():10.4g}  mean {data.mean():10.4g}  max {data.max():10.4g}")

        f.visititems(visit)


def demo(directory: str) -> None:
    """Start a tier in ``directory``, write a small simulation's output through it, analyse it."""
    from mpiburst.tier import Tier

    bfs = os.path.abspath(os.path.join(directory, "bfs"))
    os.makedirs(bfs, exist_ok=True)
    with Tier.start(id="h5analysis", dir=os.path.abspath(directory), bfs_root=bfs, capacity="128M"):
        with mh5.File("burst://sim.h5", "w") as f:
            f.attrs["code"] = "toy heat equation"
            u = np.zeros((64, 64))
            u[28:36, 28:36] = 100.0
            for step in range(4):
                f.create_dataset(f"steps/{step}/u", data=u)
                f[f"steps/{step}"].attrs["time"] = step * 0.1
                u = u + 0.2 * (np.roll(u, 1, 0) + np.roll(u, -1, 0) + np.roll(u, 1, 1) + np.roll(u, -1, 1) - 4 * u)
        print(f"BFS holds {os.listdir(bfs) or 'nothing yet'}; reading from the tier:")
        summarise("burst://sim.h5")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", help="burst://path of an HDF5 file in the running tier")
    parser.add_argument("--demo", metavar="DIR", help="start a tier in DIR and analyse a toy simulation")
    args = parser.parse_args()
    try:
        if args.demo:
            demo(args.demo)
        elif args.file:
            summarise(args.file)
        else:
            parser.error("give a burst:// file or --demo DIR")
    except (MpiburstError, OSError) as exc:
        print(f"h5_analysis: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
