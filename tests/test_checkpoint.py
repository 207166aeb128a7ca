"""Checkpoints on the memory tier, one process: what a save, a flush, a restore and a halt mean (docs/checkpoint.md)."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

import mpiburst
from mpiburst import checkpoint, flush, halt
from mpiburst.checkpoint import MANIFEST, Catalog, Checkpoints
from mpiburst.cli import main as cli_main
from mpiburst.errors import CheckpointError, ConfigError, PathError


def payload(step: int, size: int = 70_000) -> bytes:
    return bytes((step * 7 + i) % 251 for i in range(size))


def save(ck: Checkpoints, step: int, output: bool = False, files: tuple[str, ...] = ("u.dat",)):
    with ck.save(step, output=output) as c:
        for name in files:
            with mpiburst.open(c.path(name), "wb") as f:
                f.write(payload(step))
    return c


def bfs_only(tier) -> dict[int, str]:
    """The complete checkpoints a job on a new tier would find: the BFS's alone."""
    return {s: e.where() for s, e in Catalog("sim", bfs_root=tier.bfs_root).scan().items()}


def test_flush_every_keep_and_restore(mem_tier):
    ck = Checkpoints(None, "sim", keep=2, flush_every=3)
    assert repr(ck) == (f"Checkpoints('sim' in {mem_tier.bfs_root}/sim, keep=2, flush_every=3, ranks=1, "
                        "tier='memory')")
    assert ck.latest() is None
    flushing = [save(ck, k).flushing for k in range(1, 8)]
    assert flushing == [False, False, True, False, False, True, False]
    ck.wait()
    assert ck.latest() == 7
    assert {e.step: e.where() for e in ck.entries()} == {3: "bfs", 6: "tier+bfs", 7: "tier"}
    assert bfs_only(mem_tier) == {3: "bfs", 6: "bfs"}
    with ck.restore(ck.latest()) as c:
        assert c.step == 7 and c.files == {"u.dat": 70_000}
        with mpiburst.open(c.path("u.dat")) as f:
            assert f.read() == payload(7)
    with open(os.path.join(mem_tier.bfs_root, "sim", "ckpt.6", "u.dat"), "rb") as f:
        assert f.read() == payload(6)


def test_output_is_always_flushed_and_close_flushes_the_newest(mem_tier):
    ck = Checkpoints(None, "sim", keep=3, flush_every=10)
    assert save(ck, 1, output=True).flushing
    save(ck, 2)
    save(ck, 3)
    ck.wait()
    assert bfs_only(mem_tier) == {1: "bfs"}
    ck.close()
    assert bfs_only(mem_tier) == {1: "bfs", 3: "bfs"}


def test_a_failed_save_leaves_latest_and_nothing_behind(mem_tier):
    ck = Checkpoints(None, "sim", keep=2, flush_every=1)
    save(ck, 1)
    with pytest.raises(ZeroDivisionError), ck.save(2) as c, mpiburst.open(c.path("u.dat"), "wb") as f:
        f.write(b"half")
        1 / 0   # noqa: B018 - the application fails in the middle of its save
    assert ck.latest() == 1
    assert not os.path.exists(os.path.join(mem_tier.bfs_root, "sim", "ckpt.2"))
    assert mpiburst.residency.ls("burst://sim/ckpt.2", tier=mem_tier) == []
    with pytest.raises(CheckpointError, match="holds no file"), ck.save(3):
        pass
    assert ck.latest() == 1


def test_a_failed_flush_never_leaves_a_complete_copy_on_the_bfs(mem_tier, monkeypatch):
    def broken(path, offset, length):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(flush.writes, "write_observers", [broken])
    ck = Checkpoints(None, "sim", keep=1, flush_every=1)
    save(ck, 1)
    with pytest.raises(CheckpointError, match="flush of checkpoint 1 of sim failed"):
        ck.wait()
    assert bfs_only(mem_tier) == {}
    assert not os.path.exists(os.path.join(mem_tier.bfs_root, "sim", "ckpt.1", MANIFEST))
    assert ck.latest() == 1       # complete in the tier still
    monkeypatch.setattr(flush.writes, "write_observers", [])
    save(ck, 2)
    ck.wait()
    assert bfs_only(mem_tier) == {2: "bfs"}
    assert {e.step: e.where() for e in ck.entries()} == {1: "tier", 2: "tier+bfs"}   # keep=1; 1's only copy stays


def test_several_files_reach_the_bfs_all_or_nothing_in_one_commit_and_one_file_by_its_own_sync(mem_tier,
                                                                                                monkeypatch):
    """Promise: a checkpoint's data reaches the BFS all or nothing, before its manifest; a one-file checkpoint
    needs no commit (its rename alone is atomic), so its flush skips the commit's journal."""
    commits = []
    real_commit = flush.commit

    def counted(*args, **kwargs):
        commits.append(kwargs.get("select"))
        return real_commit(*args, **kwargs)

    def broken(path, offset, length):
        if "v.dat" in path:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(flush, "commit", counted)
    monkeypatch.setattr(flush.writes, "write_observers", [broken])
    ck = Checkpoints(None, "sim", keep=4, flush_every=1)
    save(ck, 1, files=("u.dat", "v.dat"))
    with pytest.raises(CheckpointError, match="flush of checkpoint 1 of sim failed"):
        ck.wait()
    assert not os.path.exists(os.path.join(mem_tier.bfs_root, "sim", "ckpt.1", "u.dat"))   # v.dat failed: no u.dat
    assert bfs_only(mem_tier) == {} and len(commits) == 1
    monkeypatch.setattr(flush.writes, "write_observers", [])
    save(ck, 2)
    ck.wait()
    assert bfs_only(mem_tier) == {2: "bfs"} and len(commits) == 1     # one file: synced, no commit
    save(ck, 3, files=("u.dat", "v.dat"))
    ck.close()
    assert bfs_only(mem_tier) == {2: "bfs", 3: "bfs"} and len(commits) == 2
    for name in ("u.dat", "v.dat"):
        with open(os.path.join(mem_tier.bfs_root, "sim", "ckpt.3", name), "rb") as f:
            assert f.read() == payload(3)


def test_two_objects_flush_in_the_order_they_asked_and_each_hears_only_its_own_errors(mem_tier, monkeypatch):
    """Promise: what the application completed first is never missing from the BFS when something later is there,
    across Checkpoints objects of one process (they share rank 0's one flush thread)."""
    held, gate = threading.Event(), threading.Event()

    def hold_fluid(path, offset, length):   # the fluid's flush waits in its first write until the test looked
        if "/fluid/" in path:
            held.set()
            assert gate.wait(10)
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(flush.writes, "write_observers", [hold_fluid])
    fluid, parts = Checkpoints(None, "fluid", flush_every=1), Checkpoints(None, "parts", flush_every=1)
    save(fluid, 1)
    save(parts, 1)
    assert held.wait(10)
    time.sleep(0.3)   # a flusher of its own would have put parts' checkpoint on the BFS by now
    assert Catalog("parts", bfs_root=mem_tier.bfs_root).scan() == {}
    gate.set()
    parts.wait()      # waits for the fluid's flush too (asked for first), but its error is the fluid's
    assert {e.step: e.where() for e in parts.entries()} == {1: "tier+bfs"}
    with pytest.raises(CheckpointError, match="flush of checkpoint 1 of fluid failed"):
        fluid.close()
    parts.close()


def test_a_manifest_whose_files_are_short_on_the_bfs_does_not_count(mem_tier):
    ck = Checkpoints(None, "sim", keep=1, flush_every=1)
    for k in (1, 2):
        save(ck, k)
    ck.wait()
    os.truncate(os.path.join(mem_tier.bfs_root, "sim", "ckpt.2", "u.dat"), 100)
    assert bfs_only(mem_tier) == {1: "bfs"}


def test_restore_falls_back_to_the_next_older_with_a_warning(mem_tier):
    ck = Checkpoints(None, "sim", keep=1, flush_every=1)
    for k in (1, 2, 3):
        save(ck, k)
    ck.close()
    later = Checkpoints(None, "sim", tier=mpiburst.Tier.memory(mem_tier.bfs_root))   # a new, empty tier
    assert later.latest() == 3
    os.unlink(os.path.join(mem_tier.bfs_root, "sim", "ckpt.3", "u.dat"))
    os.truncate(os.path.join(mem_tier.bfs_root, "sim", "ckpt.2", "u.dat"), 5)
    assert later.latest() == 1                  # neither is complete on the BFS any more
    with pytest.raises(CheckpointError, match="no complete checkpoint 3"):
        later.restore(3)


def test_restore_skips_a_checkpoint_unreadable_in_the_tier(mem_tier):
    ck = Checkpoints(None, "sim", keep=3, flush_every=100)
    for k in (1, 2):
        save(ck, k)
    mpiburst.purge("burst://sim/ckpt.2/u.dat", force=True)   # the tier lost its data, the manifest stays
    with pytest.warns(RuntimeWarning, match="checkpoint 2 of sim cannot be read"):
        c = ck.restore()
    assert c.step == 1
    assert ck.latest() == 1


def test_a_restore_that_raises_is_left_out_of_latest(mem_tier):
    ck = Checkpoints(None, "sim", keep=3, flush_every=100)
    for k in (1, 2):
        save(ck, k)
    with pytest.raises(ValueError), ck.restore() as c:
        assert c.step == 2
        raise ValueError("the application found the data wrong")
    assert ck.latest() == 1


def test_saving_a_step_again_replaces_it(mem_tier):
    ck = Checkpoints(None, "sim", keep=2, flush_every=1)
    save(ck, 1, files=("a.dat", "b.dat"))
    ck.wait()
    save(ck, 1, files=("a.dat",))
    ck.wait()
    assert sorted(os.listdir(os.path.join(mem_tier.bfs_root, "sim", "ckpt.1"))) == [MANIFEST, "a.dat"]
    assert ck.restore(1).files == {"a.dat": 70_000}


def test_h5_files_in_a_checkpoint(mem_tier):
    np = pytest.importorskip("numpy")
    h5 = pytest.importorskip("mpiburst.h5")
    ck = Checkpoints(None, "sim", keep=1, flush_every=1)
    with ck.save(4) as c, h5.File(c.path("state.h5"), "w") as f:
        f["u"] = np.arange(1000.0)
    ck.close()
    again = Checkpoints(None, "sim", tier=mpiburst.Tier.memory(mem_tier.bfs_root))
    with again.restore() as c, h5.File(c.path("state.h5"), "r") as f:
        assert c.step == 4 and (f["u"][:] == np.arange(1000.0)).all()


def test_bad_arguments_say_what_to_do(mem_tier):
    with pytest.raises(ConfigError, match="keep must be"):
        Checkpoints(None, "sim", keep=0)
    with pytest.raises(PathError, match="BFS root itself"):
        Checkpoints(None, ".")
    ck = Checkpoints(None, "sim")
    with pytest.raises(ConfigError, match="step must be"):
        ck.save(-1)
    with ck.save(1) as c:
        for bad in ("../x", "/etc/passwd", MANIFEST, ""):
            with pytest.raises(PathError):
                c.path(bad)
        with mpiburst.open(c.path("d/u.dat"), "wb") as f:
            f.write(b"ok")
    assert ck.restore().files == {"d/u.dat": 2}


# ----------------------------------------------------------------------------- halting

def test_halt_immediate_flushes_the_newest_and_later_saves(mem_tier):
    ck = Checkpoints(None, "sim", keep=2, flush_every=100)
    save(ck, 1)
    assert not ck.should_exit()
    halt.set_halt(halt.halt_path(mem_tier.conf.dir, mem_tier.id), immediate=True)
    assert ck.should_exit() and ck.exit_reason == "halt --immediate"
    assert save(ck, 2).flushing
    ck.wait()
    assert bfs_only(mem_tier) == {1: "bfs", 2: "bfs"}


def test_halt_after_n_more_checkpoints(mem_tier):
    ck = Checkpoints(None, "sim", keep=2, flush_every=100)
    save(ck, 1)
    halt.set_halt(halt.halt_path(mem_tier.conf.dir, mem_tier.id), checkpoints=2)
    save(ck, 2)
    assert not ck.should_exit()
    save(ck, 3)
    assert ck.should_exit()
    ck.close()
    assert bfs_only(mem_tier) == {3: "bfs"}


def test_time_limit_margin_grows_with_the_checkpoint(mem_tier, monkeypatch):
    ck = Checkpoints(None, "sim", keep=2, flush_every=100)
    save(ck, 1)
    small = ck.margin()
    with ck.save(2) as c, mpiburst.open(c.path("u.dat"), "wb") as f:
        f.write(bytes(50 << 20))
    assert ck.margin() >= small + (50 << 20) / 100e6 * 0.9
    monkeypatch.setenv("MPIBURST_END_TIME", str(time.time() + ck.margin() + 3600))
    assert not ck.should_exit()
    monkeypatch.setattr(checkpoint, "LIMIT_REFRESH", 0.0)    # the next check reads the end time again
    monkeypatch.setenv("MPIBURST_END_TIME", str(time.time() + ck.margin() - 1))
    assert ck.should_exit() and "time limit" in (ck.exit_reason or "")
    ck.close()
    assert 2 in bfs_only(mem_tier)


def test_halt_before_uses_the_margin_and_seconds_sets_a_floor(mem_tier, monkeypatch):
    path = halt.halt_path(mem_tier.conf.dir, mem_tier.id)
    ck = Checkpoints(None, "sim")
    save(ck, 1)
    halt.set_halt(path, before=time.time() + ck.margin() + 600)
    assert not ck.should_exit()
    halt.set_halt(path, before=time.time() + ck.margin() - 1)
    assert ck.should_exit() and ck.exit_reason.startswith("halt --before")
    with open(path, "w") as f:
        f.write("garbage")
    with pytest.warns(RuntimeWarning, match="not a halt file"):
        assert not Checkpoints(None, "sim").should_exit()      # a damaged halt file does not end the job
    halt.remove_halt(path)
    ck2 = Checkpoints(None, "sim")
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(time.time() + 1000)))
    assert not ck2.should_exit()
    halt.set_halt(path, seconds=2000)
    ck3 = Checkpoints(None, "sim")
    assert ck3.should_exit()


def test_batch_system_outputs_are_read():
    assert halt.slurm_end_time("2026-12-07T15:30:00\n") == halt.parse_time("2026-12-07T15:30:00")
    assert halt.slurm_end_time("Unknown\n") is None
    qstat = ("Job Id: 12.server\n    Resource_List.walltime = 01:30:00\n"
             "    stime = Mon Dec  7 13:00:00 2026\n")
    assert halt.pbs_end_time(qstat) == halt.parse_time("2026-12-07T13:00:00") + 5400
    assert halt.parse_walltime("90") == 90 and halt.parse_walltime("1:00:00") == 3600
    assert halt.parse_time("@1700000000") == 1700000000
    now = halt.parse_time("2026-12-07T13:00:00")
    assert halt.parse_time("14:00", now=now) == now + 3600
    assert halt.parse_time("12:00", now=now) == now + 23 * 3600
    with pytest.raises(ConfigError, match="is not a time"):
        halt.parse_time("soon")


def test_halt_file_is_private_and_a_bad_one_says_so(tmp_path):
    path = str(tmp_path / "halt_x.json")
    halt.set_halt(path, checkpoints=3)
    halt.set_halt(path, immediate=True)
    assert os.stat(path).st_mode & 0o777 == 0o600
    got = halt.read_halt(path)
    assert got is not None and got.checkpoints == 3 and got.immediate
    with open(path, "w") as f:
        f.write("{}x")
    with pytest.raises(ConfigError, match="not a halt file"):
        halt.read_halt(path)


# ----------------------------------------------------------------------------- the commands

def test_cli_halt_list_show_drop(mem_tier, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    os.mkdir(run_dir)
    assert cli_main(["halt", "--id", "j1", "--dir", run_dir, "--checkpoints", "2", "--seconds", "600"]) == 0
    assert "after 2 more checkpoint(s)" in capsys.readouterr().out
    assert halt.read_halt(os.path.join(run_dir, "halt_j1.json")).seconds == 600
    assert cli_main(["halt", "--id", "j1", "--dir", run_dir, "--before", "soon"]) == 2
    assert "is not a time" in capsys.readouterr().err
    assert cli_main(["halt", "--id", "j1", "--dir", run_dir, "--remove"]) == 0
    assert not os.path.exists(os.path.join(run_dir, "halt_j1.json"))

    ck = Checkpoints(None, "sim", keep=2, flush_every=1)
    for k in (1, 2):
        save(ck, k)
    ck.close()
    root = mem_tier.bfs_root
    assert cli_main(["ckpt", "list", "sim", "--bfs-root", root]) == 0
    out = capsys.readouterr().out
    assert "1" in out and "2" in out and "bfs" in out
    assert cli_main(["ckpt", "show", "sim", "--bfs-root", root, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["step"] == 2 and shown["files"] == {"u.dat": 70_000}
    assert cli_main(["ckpt", "drop", "sim", "2", "--bfs-root", root]) == 0
    assert not os.path.exists(os.path.join(root, "sim", "ckpt.2"))
    assert cli_main(["ckpt", "show", "sim", "9", "--bfs-root", root]) == 1
    assert "no complete checkpoint 9" in capsys.readouterr().err
