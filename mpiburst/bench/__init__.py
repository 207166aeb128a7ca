"""The mpiburst benchmark: mpiburst against direct MPI-IO and against the machine's limits.

Run as ``mpiexec -n N mpiburst bench ...``. For each access pattern
(:mod:`.patterns`) and transfer size it measures, on the same bytes and in the
same run, the limits of the machine and a direct MPI-IO peer
(:mod:`.baselines`) and mpiburst itself (:mod:`.burst`), then prints a table,
writes JSON and a plot (:mod:`.report`). :mod:`.main` drives the whole run.
"""
