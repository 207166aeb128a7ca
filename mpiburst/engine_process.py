"""The automatic engine's process: started beside a run's server, logging to a 0600 file.

Kept apart from the engine's loop (:mod:`mpiburst.engine`, which flushes and
purges through the layers above the tier) so that :class:`~mpiburst.tier.Tier`
and the lifecycle commands can start the engine without importing those
layers: the engine runs as ``python -m mpiburst.engine --conf PATH``.
"""

from __future__ import annotations

import os
import subprocess
import sys

from .runconf import RunConf, engine_log_name
from .server.process import adopt


def log_path(conf: RunConf) -> str:
    """Return the engine's log file of a run: ``mpiburst_<id>.engine.log`` in the run directory."""
    return os.path.join(conf.dir, engine_log_name(conf.id))


def open_log(path: str) -> int:
    """Open the log for appending, creating it 0600 from the first byte (never through a symlink)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)


def package_env(**extra: str) -> dict[str, str]:
    """Return this process's environment (plus ``extra``) with this mpiburst first on ``PYTHONPATH``.

    For the background processes mpiburst starts with ``python -m`` (the
    engine, a named tier's destroy at expiry): they run this same package.
    """
    env = dict(os.environ, **extra)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([here] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def spawn(conf: RunConf) -> int:
    """Start the engine of a run in the background and return its PID.

    Call it right after the server started and the conf was saved; record the
    PID as ``conf.engine_pid``. The engine's output goes to its log file.
    """
    fd = open_log(log_path(conf))
    try:
        proc = subprocess.Popen([sys.executable, "-m", "mpiburst.engine", "--conf", conf.path],
                                stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, cwd=conf.dir, env=package_env(),
                                start_new_session=True)
    finally:
        os.close(fd)
    return adopt(proc)  # one registry of this process's children, servers and engines alike


def attach(conf: RunConf) -> RunConf:
    """Start the engine beside a run's freshly started server and record its PID in the conf.

    Every way of starting a run (``Tier.start``, ``mpiburst start``, ``mpiburst
    run``, ``mem_io_start``) calls this; ``server.stop_run`` stops the engine
    by that PID, and the engine also exits by itself once the server is gone.
    """
    conf.engine_pid = spawn(conf)
    conf.save()
    return conf
