"""Unit tests of run IDs, the secure conf file and alignment detection (no server)."""

from __future__ import annotations

import os
import stat

import pytest

from mpiburst.align import detect_align
from mpiburst.errors import ConfigError
from mpiburst.runconf import RunConf, find_conf_path, read_secure, resolve_id, validate_id, write_secure


def _conf(directory, **changes) -> RunConf:
    fields = dict(id="r1", dir=str(directory), host="127.0.0.1", port=1234, socket=f"{directory}/s",
                  user="mpiburst", password="p" * 64,
                  channels=2, bfs_root=str(directory), capacity=1 << 20, align=1 << 20, pid=None, server="x")
    fields.update(changes)
    return RunConf(**fields)


@pytest.fixture
def no_id_env(monkeypatch):
    for name in ("MPIBURST_ID", "SLURM_JOB_ID", "PBS_JOBID", "MPIBURST_CONF"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_id_order(no_id_env):
    no_id_env.setenv("PBS_JOBID", "123.pbs")
    assert resolve_id() == "123.pbs"
    no_id_env.setenv("SLURM_JOB_ID", "77")
    assert resolve_id() == "77"
    no_id_env.setenv("MPIBURST_ID", "mine")
    assert resolve_id() == "mine"
    assert resolve_id("explicit") == "explicit"


def test_default_id_warns_not_unique(no_id_env, capsys):
    assert resolve_id(warn=True) == "default"
    assert "not unique" in capsys.readouterr().err
    assert resolve_id() == "default"
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("bad", ["a/b", "..", "x y", "a;rm", "", "é"])
def test_bad_ids_refused(bad, no_id_env):
    with pytest.raises(ConfigError, match="not usable in file names"):
        validate_id(bad)
    if bad:
        no_id_env.setenv("MPIBURST_ID", bad)
        with pytest.raises(ConfigError):
            resolve_id()


def test_save_load_roundtrip_0600(tmp_path):
    conf = _conf(tmp_path)
    conf.save()
    st = os.stat(conf.path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert RunConf.load(conf.path) == conf
    assert os.listdir(tmp_path) == ["mpiburst_r1.conf"]  # no temporary file left


def test_write_secure_replaces_atomically_and_private(tmp_path, monkeypatch):
    path = tmp_path / "secret"
    modes = []
    real_open = os.open

    def spy(p, flags, mode=0o777, *a, **k):
        if flags & os.O_CREAT:
            modes.append((flags & os.O_EXCL, mode))
        return real_open(p, flags, mode, *a, **k)

    monkeypatch.setattr(os, "open", spy)
    write_secure(str(path), "one")
    write_secure(str(path), "two")
    assert modes == [(os.O_EXCL, 0o600)] * 2
    assert path.read_text() == "two"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_refuse_group_or_world_accessible(tmp_path, mode):
    conf = _conf(tmp_path)
    conf.save()
    os.chmod(conf.path, mode)
    with pytest.raises(ConfigError, match="accessible by group or others"):
        RunConf.load(conf.path)


def test_refuse_symlink(tmp_path):
    conf = _conf(tmp_path)
    conf.save()
    link = tmp_path / "mpiburst_link.conf"
    link.symlink_to(conf.path)
    with pytest.raises(ConfigError, match="symlink"):
        RunConf.load(str(link))


def test_refuse_other_owner(tmp_path):
    if os.geteuid() == 0:
        conf = _conf(tmp_path)
        conf.save()
        os.chown(conf.path, 65534, 65534)
        path = conf.path
    else:
        path = "/etc/passwd"  # owned by root, not by the tester
    with pytest.raises(ConfigError, match="not by you"):
        read_secure(path)


def test_refuse_truncated(tmp_path):
    conf = _conf(tmp_path)
    write_secure(conf.path, conf.to_json()[:40])
    with pytest.raises(ConfigError, match="truncated or not valid JSON"):
        RunConf.load(conf.path)


def test_refuse_missing_password(tmp_path):
    conf = _conf(tmp_path, password="")
    conf.save()
    with pytest.raises(ConfigError, match="has no password"):
        RunConf.load(conf.path)


def test_refuse_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no run conf"):
        RunConf.load(str(tmp_path / "mpiburst_nope.conf"))


def test_find_conf_path_honours_env(tmp_path, no_id_env):
    no_id_env.setenv("MPIBURST_CONF", "/somewhere/mpiburst_a.conf")
    assert find_conf_path() == "/somewhere/mpiburst_a.conf"
    assert find_conf_path("b", str(tmp_path)) == str(tmp_path / "mpiburst_b.conf")


# ------------------------------------------------------------------ alignment

def test_align_explicit(tmp_path):
    assert detect_align(str(tmp_path), "4M") == 4 << 20
    with pytest.raises(ConfigError):
        detect_align(str(tmp_path), "0")


def test_align_block_size_rounded_to_mib(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no lfs
    align = detect_align(str(tmp_path / "not" / "yet"))
    assert align % (1 << 20) == 0 and align >= os.statvfs(tmp_path).f_bsize


@pytest.mark.parametrize("script, expected", [("echo 4194304", 4 << 20), ("exit 1", 1 << 20)])
def test_align_lustre_stripe(tmp_path, monkeypatch, script, expected):
    lfs = tmp_path / "lfs"
    lfs.write_text(f"#!/bin/sh\n{script}\n")
    lfs.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    if expected == 1 << 20:
        expected = -(-os.statvfs(tmp_path).f_bsize // (1 << 20)) * (1 << 20)
    assert detect_align(str(tmp_path)) == expected
