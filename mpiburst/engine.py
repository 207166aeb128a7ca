"""The automatic residency engine: a process beside a run's server that syncs and purges by thresholds.

Started by whoever starts the server (:func:`mpiburst.engine_process.attach`
runs ``python -m mpiburst.engine --conf PATH``) and stopped with SIGTERM by
its PID (``server.stop_run``). Every ``interval`` (0.5 s) it:

* serves the queued requests of non-blocking ``sync`` and ``prestage``
  (the store's request queue, :meth:`mpiburst.store.Store.dequeue`), the
  syncs in a row as one commit of many files;
* reads the server's memory use (``INFO memory``: ``used_memory`` against
  ``maxmemory``); at or above the run's ``sync_threshold`` (default 0.5) it
  syncs the dirty unpinned files as the application last closed or
  synced them (docs/consistency.md, "Published states"); at or above
  ``purge_threshold`` (0.8) it drops the clean data of unpinned files.
  On a multi-node run the thresholds apply to each server: the fullest
  node's fill decides (one engine, on rank 0's node, for the whole run);
* logs, for the run's I/O report (:mod:`mpiburst.iostats`), a tier-fill
  sample when one is due (every second at first) and an event for each sync
  and purge it does.

A transient error never stops it: it is logged to ``mpiburst_<id>.engine.log``
(mode 0600) in the run directory and the loop goes on. It exits when the
server is gone or its run conf was removed.

Beside a site's server (``python -m mpiburst.engine --tier URL``, a
``valkey://`` / ``rediss://`` URL of :mod:`mpiburst.server.site`) nobody
starts it: whoever wants the queued requests served and the thresholds
applied runs it, its log in the current directory, until SIGTERM (the
site's server has no PID of ours to watch; a lost connection is logged and
tried again). The thresholds are the URL's ``sync_threshold`` and
``purge_threshold`` (default 0.5 and 0.8) of each server's ``maxmemory``;
a site's server has no TTL, so nothing expires.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import flush, iostats, named, residency
from .engine_process import log_path, open_log
from .errors import ConfigError, MpiburstError, TierConnectionError
from .server import pid_alive
from .server.site import SCHEMES as SITE_SCHEMES
from .tier import Tier

#: Seconds between two rounds of the engine (also the longest wait for a queued request).
INTERVAL = 0.5
#: Queued requests served per round, so the thresholds are checked often even with a long queue.
REQUESTS_PER_ROUND = 16
#: Seconds before a named tier's end at expiry is tried again after its destroy failed.
EXPIRY_RETRY = 60.0

def _sync_path(raw: bytes) -> str | None:
    """Return the path of a well-formed sync request, else None (served, or refused, one by one)."""
    try:
        req = json.loads(raw)
        return req["path"] if req["op"] == "sync" and isinstance(req["path"], str) else None
    except (ValueError, KeyError, TypeError):
        return None


class Engine:
    """One run's engine loop (see the module docstring).

    Parameters
    ----------
    tier
        A connected :class:`~mpiburst.tier.Tier`.
    log
        Where to report what it did and what failed.
    """

    def __init__(self, tier: Tier, log: logging.Logger, interval: float = INTERVAL) -> None:
        self.tier = tier
        self.log = log
        self.interval = interval
        self.stopping = False
        self.sampler = iostats.FillSampler()
        self.warned_expiry = False
        #: The ``mpiburst destroy`` this engine started at its named tier's expiry (it stops the engine).
        self.destroyer: subprocess.Popen | None = None
        #: When (``time.monotonic()``) the expiry may be tried again after a destroy that failed.
        self.retry_at = 0.0

    def memory(self) -> tuple[int, int]:
        """Return ``(used_memory, capacity)`` in bytes of the server, or of the fullest node's on a cluster.

        A multi-node run's nodes fill separately (each holds what its ranks
        wrote), so the thresholds apply to each server: one full node must
        be relieved although the cluster as a whole is not.
        """
        each = [(used, limit or self.tier.capacity) for used, limit in self.tier.store.node_memory()]
        return max(each, key=lambda m: m[0] / m[1])

    def serve_queue(self) -> None:
        """Carry out queued requests; wait up to one interval for the first one.

        Sync requests in a row are served together, as one commit of their
        files (:func:`mpiburst.flush.commit`: many files at once), not one
        flush after the other; a request of another kind ends the row, so
        the order of requests on one file is kept.
        """
        syncs: list[str] = []
        for k in range(REQUESTS_PER_ROUND):
            if self.stopping:
                break
            raw = self.tier.store.dequeue(timeout=self.interval if k == 0 else 0)
            if raw is None:
                break
            path = _sync_path(raw)
            if path is not None:
                syncs.append(path)
                continue
            self._sync(syncs)
            syncs = []
            self._serve(raw)
        self._sync(syncs)

    def _sync(self, paths: list[str]) -> None:
        """Sync the requested files together; if that fails, one by one (one file's failure keeps no other back)."""
        paths = list(dict.fromkeys(paths))
        if len(paths) > 1:
            try:
                reports = {r.path: r for r in flush.commit(paths=paths, tier=self.tier)}
            except MpiburstError as exc:
                self.log.error("sync of %d requested files together failed (%s); syncing them one by one",
                               len(paths), exc)
            else:
                for path in paths:
                    if path in reports or self.tier.store.meta(path) is not None:   # clean: nothing to write
                        self._synced(path, reports.get(path))
                    else:
                        self.log.error("%s is not in the tier; there is nothing to sync.", path)
                return
        for path in paths:
            try:
                self._synced(path, flush.sync(path, tier=self.tier))
            except MpiburstError as exc:
                self.log.error("%s", exc)

    def _synced(self, path: str, rep: flush.FlushReport | None) -> None:
        """Log a requested sync of ``path`` (``rep`` None: the file was clean) and its I/O event."""
        written, writes, seconds = (rep.bytes, rep.writes, rep.seconds) if rep is not None else (0, 0, 0.0)
        self.log.info("sync %s: %d bytes in %d writes, %.3f s", path, written, writes, seconds)
        iostats.log_event(self.tier.store, "sync", trigger="request", path=path, bytes=written, seconds=seconds)

    def _serve(self, raw: bytes) -> None:
        try:
            req = json.loads(raw)
            if req["op"] == "sync":   # one that _sync_path refused
                self.log.error("malformed request %r ignored", raw[:200])
            elif req["op"] == "prestage":
                n = residency.prestage(req["path"], keep=bool(req.get("keep")), tier=self.tier)
                self.log.info("prestage %s: %d bytes", req["path"], n)
                iostats.log_event(self.tier.store, "prestage", path=req["path"], bytes=n)
            else:
                self.log.error("unknown request %r ignored", req)
        except MpiburstError as exc:
            self.log.error("%s", exc)
        except (ValueError, KeyError, TypeError):
            self.log.error("malformed request %r ignored", raw[:200])

    def thresholds(self) -> None:
        """Sync above the sync threshold, drop clean data above the purge threshold."""
        self.sample()
        used, cap = self.memory()
        conf = self.tier.conf
        # Only what may be published: a file being written waits for its next consistent point (its
        # writes since are dirty, but nothing of them is to sync), so it does not make a round sync.
        dirty = [m for m in residency.dirty_files(self.tier) if (s := m.settled_state()) is not None and s.dirty]
        if used >= conf.sync_threshold * cap and dirty:
            self.log.info("memory %d of %d bytes: syncing %d dirty files", used, cap, len(dirty))
            started = time.time()
            synced = residency.auto_sync(self.tier, log=self.log.error)
            iostats.log_event(self.tier.store, "sync", trigger="threshold", files=synced, dirty_files=len(dirty),
                              used=used, capacity=cap, seconds=time.time() - started)
            used, cap = self.memory()
        if used >= conf.purge_threshold * cap:
            freed = residency.auto_purge(self.tier)
            self.log.info("memory %d of %d bytes: purged %d clean bytes", used, cap, freed)
            if freed:
                iostats.log_event(self.tier.store, "purge", trigger="threshold", bytes=freed, used=used, capacity=cap)

    def expire(self) -> None:
        """End a named tier whose TTL is past (:mod:`mpiburst.named`).

        ``on_expiry`` ``flush``: a ``mpiburst destroy NAME --flush`` in the
        background writes the dirty files to the BFS and stops the tier
        (and this engine). ``keep``: the clean data is dropped; dirty files
        stay, with one warning in the engine's log, until their owner
        destroys the tier; once nothing is dirty the tier is destroyed.
        """
        meta = named.read_meta(self.tier.conf.dir) if self.tier.conf.server != "site" else None
        if meta is None or meta.left() > 0:
            return
        dirty = residency.dirty_files(self.tier, include_pinned=True)
        if meta.on_expiry == "keep" and dirty:
            freed = residency.auto_purge(self.tier)
            if not self.warned_expiry:
                self.log.warning("named tier %s expired; its %d dirty files are kept (--on-expiry keep) and %d "
                                 "clean bytes dropped: destroy it with 'mpiburst destroy %s --flush' or --discard",
                                 meta.name, len(dirty), freed, meta.name)
                self.warned_expiry = True
            return
        self.destroyer = named.spawn_destroy(meta.name, self.tier.conf.dir, flush=bool(dirty))
        self.log.info("named tier %s expired; destroying it%s (pid %d)", meta.name,
                      f" after flushing {len(dirty)} dirty files" if dirty else "", self.destroyer.pid)

    def expiry(self) -> None:
        """One round's expiry: note a destroy at expiry that failed (tried again :data:`EXPIRY_RETRY` later), else
        :meth:`expire` when none runs.

        A destroy that succeeds stops this engine; one that fails (the
        flush of the dirty files failed: a full BFS, a path taken) leaves
        the tier and its data as they were, so its end is tried again.
        """
        if self.destroyer is not None:
            code = self.destroyer.poll()
            if code is None:
                return
            self.destroyer = None
            self.retry_at = time.monotonic() + EXPIRY_RETRY
            self.log.warning("the destroy of named tier %s at its expiry failed (exit status %d; see %s); the tier "
                             "and its data stay, and it is tried again in %.0f s", self.tier.id, code,
                             named.expiry_log(self.tier.id, self.tier.conf.dir), EXPIRY_RETRY)
        if time.monotonic() >= self.retry_at:
            self.expire()

    def sample(self, force: bool = False) -> None:
        """Log a tier-fill sample for the I/O report when one is due (or ``force``)."""
        now = time.time()
        if not (force or self.sampler.due(now)):
            return
        used, limit = self.tier.store.memory()  # the whole tier's fill (all nodes' sum on a cluster)
        cap = limit or self.tier.capacity
        self.sampler.log(self.tier.store, used, cap, residency.dirty_files(self.tier, include_pinned=True),
                         self.tier.store.traffic(), now)

    def server_gone(self) -> bool:
        """True if the run's server process ended or its conf file was removed (never for a site's server)."""
        conf = self.tier.conf
        if conf.server == "site":
            return False
        return not os.path.exists(conf.path) or not pid_alive(conf.pid, conf.server)

    def run(self) -> int:
        """Loop until SIGTERM or the server's end; return the exit status (0)."""
        self.log.info("engine of run %s started (pid %d)", self.tier.id, os.getpid())
        while not self.stopping:
            if self.server_gone():
                self.log.info("the server of run %s is gone; engine exits", self.tier.id)
                return 0
            try:
                self.serve_queue()
                if not self.stopping:
                    self.thresholds()
                if not self.stopping:
                    self.expiry()
            except TierConnectionError as exc:
                self.log.warning("server connection lost (%s)", exc)
                time.sleep(self.interval)
            except Exception:  # never die on a transient error: log it and go on
                self.log.exception("engine round failed")
                time.sleep(self.interval)
        try:
            self.sample(force=True)  # the run's last sample: stop_run ends the engine before the server
        except Exception:
            self.log.exception("last tier-fill sample failed")
        self.log.info("engine of run %s stopped", self.tier.id)
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the engine of the run whose conf file is given (``--conf PATH``), or beside a site's server (``--tier URL``)."""
    parser = argparse.ArgumentParser(prog="python -m mpiburst.engine",
                                     description="The automatic sync/purge engine of an mpiburst run.")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--conf", help="the run's conf file mpiburst_<id>.conf")
    where.add_argument("--tier", metavar="URL", help="a site's server or cluster (valkey://, rediss://; see "
                       "docs/cli.md, 'Tier URLs'): run beside it until SIGTERM, logging in the current directory")
    parser.add_argument("--interval", type=float, default=INTERVAL, help="seconds between rounds")
    args = parser.parse_args(argv)
    try:
        if args.tier and args.tier.partition("://")[0] not in SITE_SCHEMES:
            raise ConfigError(f"--tier takes the URL of a site's server ({', '.join(SITE_SCHEMES)}); a named or "
                              f"job's tier runs its own engine.")
        tier = Tier.attach(args.tier) if args.tier else Tier.connect(conf=args.conf)
    except MpiburstError as exc:
        print(f"mpiburst engine: {exc}", file=sys.stderr)
        return exc.exit_code
    log = logging.getLogger("mpiburst.engine")
    handler = logging.StreamHandler(os.fdopen(open_log(log_path(tier.conf)), "a", buffering=1))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    engine = Engine(tier, log, args.interval)

    def _on_term(signum: int, frame: Any) -> None:
        engine.stopping = True

    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    return engine.run()


if __name__ == "__main__":
    sys.exit(main())
