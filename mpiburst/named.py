"""Named tiers that outlive a job: ``mpiburst create`` / ``destroy`` / ``list`` and what happens at expiry.

A named tier is a run whose ID is its name, started detached (untied, like
``mpiburst start``) with the same hardened server configuration and the
same automatic engine as a job's tier; its files live in the user's
``<tiers>/NAME/`` (:func:`mpiburst.runconf.tiers_dir`: ``~/.mpiburst/tiers``,
mode 0700; every secret file in it 0600). Jobs attach to it with
``MPIBURST_TIER=mpiburst://NAME`` (:meth:`mpiburst.tier.Tier.attach`).

Beside the run's files, ``tier.json`` (0600) records its TTL and expiry
policy. Once the TTL is past, the tier's engine (:meth:`mpiburst.engine.Engine.expire`)
ends it: with ``on_expiry`` ``flush`` it runs ``mpiburst destroy NAME
--flush`` (dirty data goes to the BFS, then the tier is gone); with ``keep``
it drops the clean data and keeps the dirty files, warning in its log and
in ``mpiburst list``, until the owner destroys the tier; a tier left with
nothing dirty is destroyed. A destroyed tier's job records (the I/O
statistics ``mpiburst report`` reads) stay in ``<tiers>/`` for its record
TTL (``create --record-ttl``, default :data:`RECORDS_TTL`, 7 days): the
records file's modification time is set to the time it may be removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from . import engine_process, iostats, jobrun, residency, server
from .errors import ConfigError, MpiburstError
from .policy import Policy
from .runconf import RunConf, conf_path, named_dir, parse_json, read_secure, tiers_dir, validate_id, write_secure
from .server import StartOptions
from .tier import Tier

#: What happens to dirty data when a named tier's TTL is past.
ON_EXPIRY = ("flush", "keep")
#: The name of the 0600 file holding a named tier's TTL and expiry policy, beside its run files.
META_NAME = "tier.json"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: Default seconds a destroyed tier's job records (its I/O statistics, for ``mpiburst report``) are kept.
RECORDS_TTL = 7 * 86400

Log = Callable[[str], None]


def parse_ttl(text: str) -> float:
    """Return the seconds of a TTL: a number with an optional unit ``s``, ``m``, ``h`` or ``d`` (``90m``, ``2d``).

    Raises
    ------
    ConfigError
        If the text is not such a duration, or not above 0.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"TTL {text!r} is not a duration above 0; give seconds or a number with s, m, h or d "
                          f"(e.g. 90m, 2d).")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


@dataclass
class TierMeta:
    """A named tier's lifetime: when it was made, its TTL, what expiry does to dirty data, how long its records stay."""

    name: str
    created: float
    ttl: float
    on_expiry: str
    record_ttl: float = RECORDS_TTL

    @property
    def expires(self) -> float:
        """The time (seconds since the epoch) at which the tier's TTL is past."""
        return self.created + self.ttl

    def left(self, now: float | None = None) -> float:
        """Seconds until expiry (negative once past)."""
        return self.expires - (time.time() if now is None else now)

    def save(self, directory: str) -> None:
        """Write ``tier.json`` into the tier's directory (0600 from the first byte)."""
        write_secure(os.path.join(directory, META_NAME), json.dumps(asdict(self)) + "\n")


def read_meta(directory: str) -> TierMeta | None:
    """Return the lifetime of the named tier whose run files are in ``directory`` (None: not a named tier).

    Raises
    ------
    ConfigError
        If ``tier.json`` is there but unsafe or not written by mpiburst.
    """
    path = os.path.join(directory, META_NAME)
    if not os.path.lexists(path):
        return None
    data = parse_json(read_secure(path, "named tier file"), path, "named tier file")
    try:
        meta = TierMeta(str(data["name"]), float(data["created"]), float(data["ttl"]), str(data["on_expiry"]),
                        float(data.get("record_ttl", RECORDS_TTL)))
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"named tier file {path} was not written by mpiburst; destroy the tier and create it "
                          f"again.") from None
    return meta


def create(name: str, capacity: str | None, ttl: str, *, on_expiry: str = "flush", record_ttl: str | None = None,
           nodes: int | None = None,
           node: int | None = None, bfs_root: str | None = None, channels: int | None = None,
           server_binary: str | None = None, bind: str | None = None, trust_network: bool | None = None,
           join_timeout: float | None = None) -> RunConf:
    """Start named tier ``name`` for ``ttl`` (detached: it outlives this process) and return its conf.

    Parameters
    ----------
    capacity
        The server's memory limit (``8G``, ``50%``), as ``mpiburst start --capacity``.
    ttl
        How long it lives (see :func:`parse_ttl`).
    on_expiry
        ``flush`` (dirty data goes to the BFS at expiry) or ``keep`` (it stays, with a warning).
    record_ttl
        How long its job records stay after it is destroyed (as ``ttl``; default :data:`RECORDS_TTL`).
    nodes, node
        A tier over ``nodes`` nodes is created one node at a time: each node
        ``node`` (0 to ``nodes`` - 1) runs this, as ``mpiburst start --nodes N
        --node K`` does (:func:`mpiburst.server.start_node`: one server per
        node joined into one cluster, mutual TLS unless ``trust_network``);
        the tiers' directory must be the same on every node. Node 0 records
        the lifetime and starts the engine.
    bind, trust_network, join_timeout
        As ``mpiburst start``'s ``--bind``, ``--trust-network``, ``--join-timeout``.

    Raises
    ------
    ConfigError
        On a bad option, or a live tier of that name.
    ServerError
        If the server does not come up.
    """
    validate_id(name)
    seconds = parse_ttl(ttl)
    keep_for = parse_ttl(record_ttl) if record_ttl is not None else RECORDS_TTL
    if on_expiry not in ON_EXPIRY:
        raise ConfigError(f"--on-expiry {on_expiry!r} is not one of {', '.join(ON_EXPIRY)}.")
    several = nodes is not None and nodes != 1
    if several and node is None or node is not None and not several:
        raise ConfigError(f"a named tier over several nodes is created one node at a time: run 'mpiburst create "
                          f"{name} --nodes N --node K' on each node K (with the same tiers' directory), or leave "
                          f"out both for one node.")
    opts = StartOptions.of(id=name, capacity=capacity, bfs_root=os.path.abspath(bfs_root or os.getcwd()),
                           channels=channels, server=server_binary, bind=bind, trust_network=trust_network)
    directory = named_dir(name, create=True)
    path = conf_path(directory, name)
    old = RunConf.load(path) if os.path.lexists(path) else None
    if old is not None and server.pid_alive(old.pid, old.server):
        raise ConfigError(f"named tier {name} exists already; use it, or end it first with "
                          f"'mpiburst destroy {name} --flush'.")
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)
    if node:   # node 0 records the lifetime; the others only start their server
        conf, _ = server.start_node(opts.replace(dir=directory), node, nodes or 1, join_timeout)
        return conf
    TierMeta(name, time.time(), seconds, on_expiry, keep_for).save(directory)
    try:
        if several:
            return engine_process.attach(server.start_node(opts.replace(dir=directory), 0, nodes or 1,
                                                           join_timeout)[0])
        return engine_process.attach(server.start_run(opts.replace(dir=directory)))
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def dirty_bytes(tier: Tier) -> tuple[int, int]:
    """Return ``(files, bytes)`` of the tier's data not on the BFS (dirty or pending)."""
    files = residency.dirty_files(tier, include_pinned=True)
    total = 0
    for meta in files:
        with contextlib.suppress(MpiburstError):   # a file removed meanwhile holds nothing
            stat = residency.frag_stat(meta.path, tier=tier)
            total += stat.dirty + stat.pending
    return len(files), total


def destroy(name: str, flush: bool = False, discard: bool = False, log: Log | None = None) -> str:
    """End named tier ``name``: optionally flush its dirty files to the BFS, stop its server, remove its files.

    Without ``flush`` or ``discard`` a tier holding data the BFS lacks is
    refused (nothing is touched). Returns a one-line report.

    Raises
    ------
    ConfigError
        If there is no such tier, both options are given, or dirty data
        would be dropped without ``discard``.
    FlushError
        If the flush fails (the tier keeps running with its data).
    """
    if flush and discard:
        raise ConfigError("choose either --flush or --discard, not both.")
    directory = named_dir(name)
    path = conf_path(directory, name)
    if not os.path.lexists(path):
        raise ConfigError(f"there is no named tier {name!r} ({path} is missing); 'mpiburst list' shows yours.")
    conf = RunConf.load(path, exposed_ok=True)
    meta: TierMeta | None = None
    with contextlib.suppress(ConfigError):   # an unreadable tier.json does not keep the tier from ending
        meta = read_meta(directory)
    keep_for = meta.record_ttl if meta is not None else RECORDS_TTL
    flushed = 0
    if server.pid_alive(conf.pid, conf.server):
        tier = Tier.connect(conf=conf)
        try:
            files, nbytes = dirty_bytes(tier)
            if files and not (flush or discard):
                raise ConfigError(f"named tier {name} holds {files} file{'s' if files != 1 else ''} with {nbytes} "
                                  f"bytes not on the BFS; destroy it with --flush to write them to the BFS "
                                  f"first, or with --discard to drop them.")
            if files and flush:
                flushed = len(jobrun.stage_out(tier, Policy(), log=log))
        finally:
            tier.disconnect()
    report = server.stop_run(conf, discard=True, exposed_ok=True)
    until = keep_records(name, directory, keep_for)
    shutil.rmtree(directory, ignore_errors=True)
    kept = (f" Its I/O records stay until {time.strftime('%Y-%m-%d %H:%M %Z', time.localtime(until))}: 'mpiburst "
            f"report --id {name} --dir {os.path.dirname(directory)}'." if until is not None else "")
    return f"{report} {'Flushed ' + str(flushed) + ' files to the BFS; ' if flush else ''}named tier {name} is gone.{kept}"


def keep_records(name: str, directory: str, keep_for: float = RECORDS_TTL) -> float | None:
    """Move a stopped tier's I/O statistics out of its directory into the tiers' one for ``keep_for`` seconds.

    ``mpiburst report --id NAME --dir <tiers>`` reads them there until
    :func:`prune_records` removes them. Returns the time they may be removed
    (set as the file's modification time), None if there were none.
    """
    saved = iostats.stats_path(directory, name)
    if not os.path.exists(saved):
        return None
    target = iostats.stats_path(os.path.dirname(directory), name)
    os.replace(saved, target)
    until = time.time() + keep_for
    os.utime(target, (until, until))   # the time they may go: prune_records needs no other record of the TTL
    return until


def prune_records(now: float | None = None) -> list[str]:
    """Remove the job records of destroyed tiers whose record TTL is past (see :func:`keep_records`); return their paths.

    The log of a destroy at expiry (:func:`expiry_log`) goes too once its
    tier is gone and it is older than :data:`RECORDS_TTL`.
    """
    root = tiers_dir()
    if not os.path.isdir(root):
        return []
    now = time.time() if now is None else now
    gone = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        records = name.startswith("mpiburst_") and name.endswith(".stats.json")
        log = name.endswith(".expiry.log") and not os.path.isdir(os.path.join(root, name[:-len(".expiry.log")]))
        if records and os.path.getmtime(path) < now or log and os.path.getmtime(path) + RECORDS_TTL < now:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            gone.append(path)
    return gone


def listing() -> list[dict[str, Any]]:
    """Return one entry per named tier of the user: name, up, used/capacity, dirty files and bytes, TTL left.

    Job records of destroyed tiers past their TTL are removed on the way (:func:`prune_records`).
    """
    root = tiers_dir()
    out: list[dict[str, Any]] = []
    if not os.path.isdir(root):
        return out
    prune_records()
    for name in sorted(os.listdir(root)):
        directory = os.path.join(root, name)
        path = conf_path(directory, name)
        if not os.path.lexists(path):
            continue
        entry: dict[str, Any] = dict(name=name, up=False, used=None, capacity=None, dirty_files=None,
                                     dirty_bytes=None, ttl_left=None, on_expiry=None, url=f"mpiburst://{name}")
        try:
            meta = read_meta(directory)
            conf = RunConf.load(path)
            entry["capacity"] = conf.capacity
            if meta is not None:
                entry.update(ttl_left=meta.left(), on_expiry=meta.on_expiry)
            state = server.status(conf)
            entry.update(up=state["up"], used=state["used_memory"])
            if state["up"]:
                tier = Tier.connect(conf=conf)
                try:
                    entry["dirty_files"], entry["dirty_bytes"] = dirty_bytes(tier)
                finally:
                    tier.disconnect()
        except MpiburstError as exc:
            entry["error"] = str(exc)
        out.append(entry)
    return out


def expiry_log(name: str, directory: str) -> str:
    """Return where the destroy at named tier ``name``'s expiry writes: ``<tiers>/NAME.expiry.log`` (it outlives the tier)."""
    return os.path.join(os.path.dirname(directory), f"{name}.expiry.log")


def spawn_destroy(name: str, directory: str, flush: bool) -> subprocess.Popen:
    """Run ``mpiburst destroy NAME [--flush]`` in the background (the engine's expiry) and return its process.

    A process of its own, in its own session: the destroy stops the engine
    that asked for it. Its output goes to ``<tiers>/NAME.expiry.log`` (0600),
    which outlives the tier.
    """
    env = engine_process.package_env(MPIBURST_TIERS_DIR=os.path.dirname(directory))
    fd = engine_process.open_log(expiry_log(name, directory))
    try:
        proc = subprocess.Popen([sys.executable, "-m", "mpiburst", "destroy", name] + (["--flush"] if flush else []),
                                stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, cwd="/", env=env,
                                start_new_session=True)
    finally:
        os.close(fd)
    return proc
