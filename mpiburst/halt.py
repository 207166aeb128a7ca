"""Halt conditions: when a checkpointing job should save one last time and stop (SCR's ``scr_halt``).

Two sources, both read by :meth:`mpiburst.checkpoint.Checkpoints.should_exit`:

* the *halt file* of a run, ``halt_<id>.json`` in the run's directory (0600,
  written whole and renamed into place), set by ``mpiburst halt``:
  ``--checkpoints N`` (stop after N more checkpoints), ``--before TIME``
  (stop early enough that the last checkpoint is durable before TIME),
  ``--after TIME`` (stop at the first check past TIME), ``--seconds S``
  (stop when less than S seconds of the job's time limit are left),
  ``--immediate``. Each option sets its own field and keeps the others, as
  ``scr_halt`` does; ``--remove`` deletes the file. The file outlives a job
  that uses the same run directory, so a restart halts at once until the
  condition is removed (as with SCR).
* the batch system's time limit: ``$SLURM_JOB_END_TIME`` if Slurm set it,
  else ``squeue -h -j $SLURM_JOB_ID -o %e``; under PBS, ``qstat -f
  $PBS_JOBID``'s start time plus ``Resource_List.walltime``.
  ``$MPIBURST_END_TIME`` (seconds since the epoch) overrides both, for other
  batch systems.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import subprocess
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace

from .errors import ConfigError
from .runconf import write_secure

#: Seconds a batch-system query may take before it is given up (the limit is then unknown).
QUERY_TIMEOUT = 10.0
#: A halt file is a few hundred bytes; anything far larger is not one.
MAX_HALT_BYTES = 1 << 16


@dataclass(frozen=True)
class Halt:
    """One run's halt condition; every field None (or False) means "not set"."""

    checkpoints: int | None = None
    before: float | None = None
    after: float | None = None
    seconds: float | None = None
    immediate: bool = False
    #: When the condition was last set (seconds since the epoch): ``checkpoints`` counts saves after it.
    set_at: float = 0.0

    def describe(self) -> str:
        """Return the condition as one line (``"none"`` when nothing is set)."""
        parts = []
        if self.immediate:
            parts.append("immediately")
        if self.checkpoints is not None:
            parts.append(f"after {self.checkpoints} more checkpoint(s)")
        if self.before is not None:
            parts.append(f"before {_iso(self.before)}")
        if self.after is not None:
            parts.append(f"after {_iso(self.after)}")
        if self.seconds is not None:
            parts.append(f"when less than {self.seconds:g} s of the time limit are left")
        return "; ".join(parts) or "none"


def halt_path(run_dir: str, run_id: str) -> str:
    """Return the path of run ``run_id``'s halt file in ``run_dir``."""
    return os.path.join(run_dir, f"halt_{run_id}.json")


def read_halt(path: str) -> Halt | None:
    """Return the halt condition in ``path``, None if there is no halt file.

    Raises
    ------
    ConfigError
        If the file is not a halt file (remove it with ``mpiburst halt --remove``).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_HALT_BYTES + 1)
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
        known = {f.name for f in fields(Halt)}
        if len(raw) > MAX_HALT_BYTES or not isinstance(data, dict) or set(data) - known:
            raise ValueError
        return Halt(**data)
    except (ValueError, TypeError):
        raise ConfigError(f"{path} is not a halt file; remove it with 'mpiburst halt --remove' and set the "
                          "condition again.") from None


def set_halt(path: str, **changes: object) -> Halt:
    """Set the fields ``changes`` of the halt condition in ``path`` (keeping the others); return the new one."""
    old = read_halt(path) or Halt()
    new = replace(old, set_at=time.time(), **changes)  # type: ignore[arg-type]
    write_secure(path, json.dumps(asdict(new)))   # 0600 from the first byte, replaced atomically
    return new


def remove_halt(path: str) -> bool:
    """Delete the halt file; return whether there was one."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def parse_time(text: str, now: float | None = None) -> float:
    """Return the moment ``text`` names, in seconds since the epoch.

    Accepts seconds since the epoch (``@1765100000`` or a bare number), an ISO
    date and time (``2026-12-07T15:30``, local time unless it has a zone), or
    ``HH:MM[:SS]`` (today, local time; tomorrow if that has passed).

    Raises
    ------
    ConfigError
        If ``text`` is none of these.
    """
    now = time.time() if now is None else now
    text = text.strip()
    with contextlib.suppress(ValueError):
        return float(text.removeprefix("@"))
    clock = re.fullmatch(r"(\d{1,2}):(\d{2})(?::(\d{2}))?", text)
    if clock:
        h, m, s = (int(g or 0) for g in clock.groups())
        if h < 24 and m < 60 and s < 60:
            today = dt.datetime.fromtimestamp(now).replace(hour=h, minute=m, second=s, microsecond=0)
            moment = today.timestamp()
            return moment if moment > now else (today + dt.timedelta(days=1)).timestamp()
    with contextlib.suppress(ValueError):
        return dt.datetime.fromisoformat(text).timestamp()
    raise ConfigError(f"{text!r} is not a time; give HH:MM, an ISO date and time such as 2026-12-07T15:30, "
                      "or seconds since the epoch.")


def parse_walltime(text: str) -> float:
    """Return the seconds of a PBS walltime ``[[HH:]MM:]SS``."""
    seconds = 0.0
    for part in text.strip().split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def batch_end_time(env: Mapping[str, str] | None = None) -> float | None:
    """Return when the batch system ends this job (seconds since the epoch), None if unknown or unlimited."""
    env = os.environ if env is None else env
    for name in ("MPIBURST_END_TIME", "SLURM_JOB_END_TIME"):
        if env.get(name):
            with contextlib.suppress(ValueError):
                return float(env[name])
    if env.get("SLURM_JOB_ID"):
        out = _query(["squeue", "-h", "-j", env["SLURM_JOB_ID"], "-o", "%e"])
        return None if out is None else slurm_end_time(out)
    if env.get("PBS_JOBID"):
        out = _query(["qstat", "-f", env["PBS_JOBID"]])
        return None if out is None else pbs_end_time(out)
    return None


def slurm_end_time(text: str) -> float | None:
    """Return the end time in ``squeue -o %e``'s output (local ISO time), None for none or ``Unknown``."""
    with contextlib.suppress(ValueError):
        return dt.datetime.fromisoformat(text.strip()).timestamp()
    return None


def pbs_end_time(text: str) -> float | None:
    """Return the job's start time plus its walltime from ``qstat -f``'s output, None if either is missing."""
    start = re.search(r"^\s*stime = (.+)$", text, re.M)
    wall = re.search(r"^\s*Resource_List\.walltime = (\S+)$", text, re.M)
    if not start or not wall:
        return None
    try:
        began = dt.datetime.strptime(" ".join(start.group(1).split()), "%a %b %d %H:%M:%S %Y").timestamp()
        return began + parse_walltime(wall.group(1))
    except ValueError:
        return None


def _query(argv: list[str]) -> str | None:
    """Return a batch command's standard output, None if it is missing, fails or hangs."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=QUERY_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _iso(moment: float) -> str:
    return dt.datetime.fromtimestamp(moment).isoformat(timespec="seconds")
