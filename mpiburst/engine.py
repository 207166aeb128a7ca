"""The automatic residency engine: a process beside a run's server that syncs and purges by thresholds.

Started by whoever starts the server (:func:`mpiburst.engine_process.attach`
runs ``python -m mpiburst.engine --conf PATH``) and stopped with SIGTERM by
its PID (``server.stop_run``). Every ``interval`` (0.5 s) it:

* serves the queued requests of non-blocking ``sync`` and ``prestage``
  (the store's request queue, :meth:`mpiburst.store.Store.dequeue`);
* reads the server's memory use (``INFO memory``: ``used_memory`` against
  ``maxmemory``); at or above the run's ``sync_threshold`` (default 0.5) it
  syncs the dirty unpinned files, the longest-dirty first; at or above
  ``purge_threshold`` (0.8) it drops the clean data of unpinned files.

A transient error never stops it: it is logged to ``mpiburst_<id>.engine.log``
(mode 0600) in the run directory and the loop goes on. It exits when the
server is gone or its run conf was removed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Sequence

from . import flush, residency
from .engine_process import log_path, open_log
from .errors import MpiburstError, TierConnectionError
from .server import pid_alive
from .tier import Tier

#: Seconds between two rounds of the engine (also the longest wait for a queued request).
INTERVAL = 0.5
#: Queued requests served per round, so the thresholds are checked often even with a long queue.
REQUESTS_PER_ROUND = 16

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

    def memory(self) -> tuple[int, int]:
        """Return ``(used_memory, capacity)`` of the server in bytes."""
        used, limit = self.tier.store.memory()
        return used, limit or self.tier.capacity

    def serve_queue(self) -> None:
        """Carry out queued requests; wait up to one interval for the first one."""
        for k in range(REQUESTS_PER_ROUND):
            if self.stopping:
                return
            raw = self.tier.store.dequeue(timeout=self.interval if k == 0 else 0)
            if raw is None:
                return
            self._serve(raw)

    def _serve(self, raw: bytes) -> None:
        try:
            req = json.loads(raw)
            if req["op"] == "sync":
                rep = flush.sync(req["path"], tier=self.tier)
                self.log.info("sync %s: %d bytes in %d writes, %.3f s", req["path"], rep.bytes, rep.writes,
                              rep.seconds)
            elif req["op"] == "prestage":
                n = residency.prestage(req["path"], keep=bool(req.get("keep")), tier=self.tier)
                self.log.info("prestage %s: %d bytes", req["path"], n)
            else:
                self.log.error("unknown request %r ignored", req)
        except MpiburstError as exc:
            self.log.error("%s", exc)
        except (ValueError, KeyError, TypeError):
            self.log.error("malformed request %r ignored", raw[:200])

    def thresholds(self) -> None:
        """Sync above the sync threshold, drop clean data above the purge threshold."""
        used, cap = self.memory()
        conf = self.tier.conf
        dirty = residency.dirty_files(self.tier)
        if used >= conf.sync_threshold * cap and dirty:
            self.log.info("memory %d of %d bytes: syncing %d dirty files", used, cap, len(dirty))
            residency.auto_sync(self.tier, log=self.log.error)
            used, cap = self.memory()
        if used >= conf.purge_threshold * cap:
            freed = residency.auto_purge(self.tier)
            self.log.info("memory %d of %d bytes: purged %d clean bytes", used, cap, freed)

    def server_gone(self) -> bool:
        """True if the run's server process ended or its conf file was removed."""
        conf = self.tier.conf
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
            except TierConnectionError as exc:
                self.log.warning("server connection lost (%s)", exc)
                time.sleep(self.interval)
            except Exception:  # never die on a transient error: log it and go on
                self.log.exception("engine round failed")
                time.sleep(self.interval)
        self.log.info("engine of run %s stopped", self.tier.id)
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the engine of the run whose conf file is given (``--conf PATH``)."""
    parser = argparse.ArgumentParser(prog="python -m mpiburst.engine",
                                     description="The automatic sync/purge engine of an mpiburst run.")
    parser.add_argument("--conf", required=True, help="the run's conf file mpiburst_<id>.conf")
    parser.add_argument("--interval", type=float, default=INTERVAL, help="seconds between rounds")
    args = parser.parse_args(argv)
    try:
        tier = Tier.connect(conf=args.conf)
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
