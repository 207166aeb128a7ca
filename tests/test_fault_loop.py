"""A randomized fault loop over ``mpiburst run``, with every BFS file checked byte for byte (issue #29).

Each trial runs, as an operator would, ``mpiburst run -- mpiexec -n 2 python
writer.py`` (without ``-m mpi4py``): two ranks write several strided
checkpoints, each closed before the next, through a small write-back buffer
(so the tier holds half of a checkpoint while it is written). Half the
trials give the run a small tier, so the engine syncs while the job runs.
A third of the trials put each checkpoint in a new directory of its own
(``step<k>/ck``, which a commit stages and publishes by one rename of the
directory), a third write it file per process (``step<k>/r<rank>``, each
rank its half on ``COMM_SELF``, the small-file path), the others side by
side in the BFS root (``ck<k>``, one rename per file).
Each trial gets one fault at a random moment: SIGKILL of the server, of
the engine or of a rank; SIGTERM to ``mpiburst run``; SIGUSR1 then SIGTERM;
SIGSTOP of the server for a few seconds; or none. After the run (and the
stage-out it advises, if it advises one), the invariants:

* every checkpoint under its final name on the BFS is the one the
  application closed, byte for byte (never a half-written one);
* the consistent cut: no checkpoint on the BFS without every earlier one;
* what the application closed is on the BFS when the server survived;
* nothing left running; no hidden file left on the BFS;
* no traceback from ``mpiburst run``, ``stage-out`` or the ranks, and the
  advice to run a stage-out only when that stage-out then works;
* progress lines that add up.

CI runs :data:`TRIALS` trials per engine, every fault kind at least once
(about a minute); ``MPIBURST_FAULT_TRIALS=200`` runs a soak by hand, and
``MPIBURST_FAULT_SEED`` replays a failed loop (its seed is in every failure
message). See docs/reliability.md, "The fault loop".
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import job_env, processes_gone

from mpiburst.runconf import RunConf

#: The fault kinds, each tried at least once per loop (``MPIBURST_FAULT_KINDS=a,b`` keeps only those).
FAULTS = tuple(k for k in ("none", "kill-server", "kill-engine", "kill-rank", "term-run", "usr1-term", "stop-server")
               if k in os.environ.get("MPIBURST_FAULT_KINDS", k).split(","))
#: Trials of one CI loop (every kind once, then random kinds); the soak sets MPIBURST_FAULT_TRIALS.
TRIALS = int(os.environ.get("MPIBURST_FAULT_TRIALS", "0")) or len(FAULTS)
#: Checkpoints per trial, bytes per checkpoint, bytes per strided record.
CHECKPOINTS, CHECKPOINT, RECORD = 6, 3 << 20, 64 << 10
#: The small tier (the engine syncs at half of it while the job runs) and the large one.
SMALL, LARGE = "16M", "256M"
#: Where checkpoint k (of rank r) lies under the BFS root, and what each layout is called.
LAYOUTS = {"ck{k}": "checkpoints side by side", "step{k}/ck": "a directory per checkpoint",
           "step{k}/r{r}": "a directory per checkpoint, a file per process"}
#: Ranks of each trial's job.
RANKS = 2
#: Seconds each rank pauses after each record with the small tier: a checkpoint then takes longer than
#: one round of the engine (0.5 s), so the engine's syncs come while one is half written.
PAUSE = 0.025

WRITER = textwrap.dedent("""\
    import os, sys, time
    import numpy as np
    from mpi4py import MPI
    import mpiburst
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    count, total, record = (int(a) for a in sys.argv[1:4])
    pause, name = float(sys.argv[4]), sys.argv[5]
    own = "{r}" in name   # file per process: each rank its half, in a file of its own
    for k in range(count):
        data = np.random.default_rng(k).integers(0, 256, total, dtype=np.uint8)
        if own:
            data = data[rank * total // size:(rank + 1) * total // size]
        f = mpiburst.File.Open(MPI.COMM_SELF if own else comm, "burst://" + name.format(k=k, r=rank),
                               MPI.MODE_WRONLY | MPI.MODE_CREATE)
        for i in range(0, len(data) // record) if own else range(rank, total // record, size):
            f.Write_at(i * record, data[i * record:(i + 1) * record])
            time.sleep(pause)
        f.Close()
        comm.Barrier()   # checkpoint k is closed by every rank
        if rank == 0:
            with open("closed", "a") as log:
                log.write(f"{k}\\n")
    """)


def expected(k: int) -> bytes:
    """The bytes of checkpoint ``k`` as the writer closes it."""
    return np.random.default_rng(k).integers(0, 256, CHECKPOINT, dtype=np.uint8).tobytes()


def _pids(workdir: Path, word: str) -> list[int]:
    """PIDs of live processes working under ``workdir`` whose command line starts with ``word``."""
    root = os.path.realpath(workdir)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if (cwd == root or cwd.startswith(root + os.sep)) and cmdline.startswith(word):
            found.append(int(entry))
    return found


def _signal(pid: int | None, sig: int) -> None:
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


class Trial:
    """One trial: run the writer under ``mpiburst run`` with one fault, then check the invariants."""

    def __init__(self, root: Path, seed: int, index: int, kind: str, server_binary: str) -> None:
        self.rnd = random.Random(f"{seed}:{index}")
        self.kind, self.index = kind, index
        self.small = self.rnd.random() < 0.5
        #: where checkpoint k (of rank r) lies under the BFS root
        self.name = self.rnd.choice(list(LAYOUTS))
        self.dir = root / f"trial{index}"
        self.bfs = self.dir / "bfs"
        self.bfs.mkdir(parents=True)
        (self.dir / "writer.py").write_text(WRITER)
        self.env = job_env(server_binary, MPIBURST_WR_BUFFER="256K")
        self.id = f"loop{index}"
        self.what = f"seed {seed} trial {index} ({kind}, {'small' if self.small else 'large'} tier, {LAYOUTS[self.name]})"
        self.notes: list[str] = []

    def mpiburst(self, *args: str, wait: bool = True):
        cmd = [sys.executable, "-m", "mpiburst", *args]
        if not wait:
            return subprocess.Popen(cmd, cwd=self.dir, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True)
        return subprocess.run(cmd, cwd=self.dir, env=self.env, capture_output=True, text=True, timeout=120)

    def run(self) -> None:
        mpiexec = str(Path(sys.executable).parent / "mpiexec")
        proc = self.mpiburst("run", "--id", self.id, "--bfs-root", "bfs", "--capacity", SMALL if self.small else LARGE,
                             "--", mpiexec, "-n", str(RANKS), sys.executable, "writer.py", str(CHECKPOINTS),
                             str(CHECKPOINT), str(RECORD), str(PAUSE if self.small else 0), self.name, wait=False)
        try:
            self.fault(proc)
            out, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"{self.what}: mpiburst run did not end within 90 s (a hang); it said: {err}")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.run_err = err
        print(f"{self.what}: mpiburst run exited {proc.returncode}; {'; '.join(n for n in self.notes if n)}")
        self.check_said(err, "mpiburst run")
        advised = f"mpiburst stage-out --id {self.id}" in err
        if advised:
            done = self.mpiburst("stage-out", "--id", self.id)
            self.check_said(done.stderr + done.stdout, "mpiburst stage-out")
            assert done.returncode == 0, f"{self.what}: the advised stage-out failed: {done.stderr}"
        self.check_bfs()
        assert processes_gone(self.dir), f"{self.what}: processes left running: {_pids(self.dir, '')}"
        if advised:   # the snapshot may keep an incomplete checkpoint: drop it, the loop is done with it
            self.mpiburst("stop", "--id", self.id, "--discard")

    def fault(self, proc: subprocess.Popen) -> None:
        """Wait for a random moment, then apply this trial's fault.

        A quarter of the trials wait a random time after the run's conf
        appears (the fault may hit the ranks' start, their first Open, or the
        stage-out); the others wait until a random number of checkpoints is
        closed, then a little more, so the fault lands while one is written.
        """
        conf_path = self.dir / f"mpiburst_{self.id}.conf"
        deadline = time.monotonic() + 60
        while not conf_path.exists() and proc.poll() is None:
            assert time.monotonic() < deadline, f"{self.what}: the run never wrote its conf"
            time.sleep(0.01)
        closed = self.dir / "closed"
        if self.rnd.random() < 0.25:
            at = time.monotonic() + self.rnd.uniform(0.2, 3.0)
        else:
            after = self.rnd.randrange(CHECKPOINTS)
            while proc.poll() is None and time.monotonic() < deadline and \
                    len(closed.read_text().split() if closed.exists() else []) < after:
                time.sleep(0.005)
            at = time.monotonic() + self.rnd.uniform(0.0, 0.8)
        while time.monotonic() < at and proc.poll() is None:
            time.sleep(0.005)
        if proc.poll() is not None or self.kind == "none":
            self.notes.append("the run ended before the fault" if self.kind != "none" else "")
            return
        self.notes.append(f"fault after {len(closed.read_text().split()) if closed.exists() else 0} checkpoints")
        try:
            conf = RunConf.load(str(conf_path))
        except Exception:       # noqa: BLE001 - the run removed it while ending: too late for a fault
            self.notes.append("conf gone")
            return
        if self.kind == "kill-server":
            _signal(conf.pid, signal.SIGKILL)
        elif self.kind == "kill-engine":
            _signal(conf.engine_pid, signal.SIGKILL)
        elif self.kind == "kill-rank":
            ranks = _pids(self.dir, f"{sys.executable} writer.py")
            if ranks:
                _signal(self.rnd.choice(sorted(ranks)), signal.SIGKILL)
            else:
                self.notes.append("no rank was running yet")
        elif self.kind == "term-run":
            _signal(proc.pid, signal.SIGTERM)
        elif self.kind == "usr1-term":
            _signal(proc.pid, signal.SIGUSR1)
            time.sleep(self.rnd.uniform(0.0, 1.0))
            _signal(proc.pid, signal.SIGTERM)
        elif self.kind == "stop-server":
            stopped = self.rnd.uniform(1.0, 6.0)
            self.notes.append(f"server stopped for {stopped:.1f} s")
            _signal(conf.pid, signal.SIGSTOP)
            time.sleep(stopped)
            _signal(conf.pid, signal.SIGCONT)

    def check_said(self, text: str, who: str) -> None:
        assert "Traceback" not in text, f"{self.what}: a traceback from {who} or a rank: {text}"
        for done, total in re.findall(r"([\d.]+ \w?i?B) of ([\d.]+ \w?i?B) \(", text):
            assert _bytes(done) <= _bytes(total), f"{self.what}: progress '{done} of {total}' does not add up"

    def files(self, k: int) -> dict[str, bytes]:
        """Checkpoint ``k``'s files under the BFS root, each with the bytes the application closed."""
        data = expected(k)
        if "{r}" not in self.name:
            return {self.name.format(k=k): data}
        part = len(data) // RANKS
        return {self.name.format(k=k, r=r): data[r * part:(r + 1) * part] for r in range(RANKS)}

    def check_bfs(self) -> None:
        found = sorted(str(p.relative_to(self.bfs)) for p in self.bfs.rglob("*"))
        hidden = [n for n in found if any(part.startswith(".") for part in n.split(os.sep))]
        assert not hidden, f"{self.what}: hidden files left on the BFS: {hidden}"
        whole, touched = [], []   # checkpoints with every file on the BFS; with any
        for k in range(CHECKPOINTS):
            there = 0
            for name, want in self.files(k).items():
                path = self.bfs / name
                if path.exists():
                    got = path.read_bytes()
                    assert _first_difference(got, want) is None, \
                        f"{self.what}: {name} on the BFS is not the file the application closed " \
                        f"({_first_difference(got, want)})"
                    there += 1
            if there:
                touched.append(k)
            if there == len(self.files(k)):
                whole.append(k)
        assert whole == list(range(len(whole))) and all(k <= len(whole) for k in touched), \
            f"{self.what}: not a consistent cut: the BFS holds checkpoints {touched}, of them whole {whole}"
        closed_log = self.dir / "closed"
        closed = [int(x) for x in closed_log.read_text().split()] if closed_log.exists() else []
        if self.kind != "kill-server":   # the server survived: nothing closed may be lost
            missing = sorted(set(closed) - set(whole))
            assert not missing, f"{self.what}: closed checkpoints {missing} are not on the BFS; run said: {self.run_err}"
        # a new directory appears with its checkpoint in it, never empty
        allowed = (r"step\d+|" if "/" in self.name else "") + \
            re.escape(self.name).replace(r"\{k\}", r"\d+").replace(r"\{r\}", r"\d+") + r"(\.incomplete)?"
        extra = [n for n in found if not re.fullmatch(allowed, n)
                 or (self.bfs / n).is_dir() and not any((self.bfs / n).iterdir())]
        assert not extra, f"{self.what}: unexpected files or empty directories on the BFS: {extra}"


def _first_difference(got: bytes, want: bytes) -> str | None:
    """Say where ``got`` first differs from ``want`` (None if equal): a 3 MiB checkpoint is not diffed by pytest."""
    if got == want:
        return None
    a, b = np.frombuffer(got, np.uint8), np.frombuffer(want, np.uint8)
    n = min(len(a), len(b))
    wrong = np.flatnonzero(a[:n] != b[:n])
    at = int(wrong[0]) if len(wrong) else n
    return (f"{len(got)} bytes against {len(want)}; the first difference at byte {at}, "
            f"{int(np.count_nonzero(a[:n] != b[:n]))} bytes differ in the common part")


def _bytes(text: str) -> float:
    number, unit = text.split()
    return float(number) * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[unit]


def _kinds(rnd: random.Random, trials: int) -> list[str]:
    """Every fault kind once (in a random order), then random kinds."""
    kinds = list(FAULTS)
    rnd.shuffle(kinds)
    return (kinds + [rnd.choice(FAULTS) for _ in range(max(0, trials - len(kinds)))])[:trials]


@pytest.mark.slow   # about a minute: one trial per fault kind, each a real run of two ranks with a real server
@pytest.mark.timeout(0)
def test_under_a_random_fault_loop_the_bfs_holds_only_closed_checkpoints_in_a_consistent_cut(
        tmp_path: Path, server_binary: str) -> None:
    """Promise: docs/reliability.md, "The fault loop": the invariants above after every trial."""
    seed = int(os.environ.get("MPIBURST_FAULT_SEED", "0")) or random.SystemRandom().randrange(1, 1 << 31)
    print(f"fault loop: MPIBURST_FAULT_SEED={seed} MPIBURST_FAULT_TRIALS={TRIALS}")
    kinds = _kinds(random.Random(seed), TRIALS)
    for index, kind in enumerate(kinds):
        Trial(tmp_path, seed, index, kind, server_binary).run()
