"""The flush engine: turn a file's fragments in the tier into large aligned writes on the BFS.

A flush of one file (:func:`sync`) works on a *snapshot*: the file's sequence
number ``S`` when the flush starts. Writes that arrive later stay dirty for the
next flush. The file ``[0, size)`` is cut into ``align``-sized stripes; each
flusher (one process, or each rank of a communicator, as ROMIO's aggregators
take file domains) takes a contiguous run of stripes and walks it
:data:`~mpiburst.flush.writes.WRITE_SIZE` bytes at a time:

1. lists the extents of those stripes with ``seq <= S``; a stripe with nothing
   newer than the clean watermark is skipped (its BFS bytes are already right),
   the others form runs of adjacent dirty stripes;
2. receives the extents' bytes straight into the run's buffer in sequence
   order (newest wins);
3. fills the bytes no extent covers from the existing BFS file (read only those
   gaps, only below the BFS size after any pending truncation), else zeros;
4. writes each run with one ``pwrite`` at its aligned offset, while a second
   thread already assembles the next :data:`~mpiburst.flush.writes.WRITE_SIZE` bytes into a second
   buffer, so the tier read and the BFS write overlap.

So the BFS sees about ``bytes / WRITE_SIZE`` write calls, each aligned and a
whole number of stripes, whatever the number of fragments, and a flusher holds
two buffers of :data:`~mpiburst.flush.writes.WRITE_SIZE` bytes.

Only stripes holding dirty data are planned: the flusher walks the file's
index, not its logical size, so a 5-byte write at offset 2**52 costs one
stripe of memory, and holes are never allocated on the BFS.

Durability: a flush never changes the BFS file in place. It writes a new
version aside as ``.<name>.mpiburst-<token>`` (for a file that exists, the
unchanged bytes are copied into it in the kernel, hole-aware, with
``copy_file_range``: a reflink on XFS or Btrfs, a server-side copy on NFS
4.2), fsyncs it and renames it over the final name, then fsyncs the
directory: a reader, or a crash, sees the old file or the new one, never a
mix. (A commit writes the files of a directory that does not exist yet
under their final names in a hidden staging directory instead, and renames
that directory into place: :mod:`~mpiburst.flush.newdirs`.) The new version gets the permissions a direct write by the application
would have given it, or the replaced file's (:mod:`mpiburst.perms`). A lock
file in the target's directory (``.mpiburst.lock``, ``flock``; one per
directory, which a commit takes once for all its files there) serialises
flushes of one BFS path by different runs. Only after every
flusher's bytes are fsync'd is the snapshot marked clean
(:meth:`~mpiburst.store.FlushLease.mark_clean`, which checks the flush still
holds the file's lease). Any failure releases the lease, leaves the data dirty and
raises :class:`~mpiburst.errors.FlushError`; a later sync completes the job.

A new file may already be partly on the BFS when its flush starts: the drain
(:mod:`mpiburst.drain`) writes its full chunks into a data file while the
application writes. The flush claims that file as its new version (under its
lock and lease), keeps each drained chunk whose extents in the snapshot are
exactly the drained ones, and writes the rest; the chunks are then dealt out
to the flushers as the drain dealt them.

On a multi-node run (one server per node, :mod:`mpiburst.store.cluster_store`),
a collective flush whose ranks span several nodes plans *locality* first:
each stripe holding dirty data is written by a rank of the node whose server
holds most of its bytes, so each rank reads mostly from its own node's
server (:func:`~mpiburst.flush.locality.share_out`); a stripe whose bytes lie on several nodes is
still assembled from all of them, in sequence order.

Non-blocking syncs (``block=False``) are queued in the store's request queue
for the automatic engine (:mod:`mpiburst.engine`).

The package is split along the flush's jobs, bottom to top:

* :mod:`~mpiburst.flush.failures`: how a failure is said (one phrase per cause);
* :mod:`~mpiburst.flush.snapshot`: the :class:`~mpiburst.flush.snapshot.Plan` of one
  flush (BFS lock, lease, snapshot, new version aside) and the lease timings;
* :mod:`~mpiburst.flush.stripes`: which stripes hold data to write, and their bytes;
* :mod:`~mpiburst.flush.locality`: which flusher writes which stripes;
* :mod:`~mpiburst.flush.writes`: the BFS writes, seal, rename and mark clean
  (:data:`~mpiburst.flush.writes.WRITE_SIZE`, ``write_observers``);
* :mod:`~mpiburst.flush.newdirs`: a commit's new directories, staged and published by one rename;
* :mod:`~mpiburst.flush.journal`: a commit's journal and :func:`recover`;
* :mod:`~mpiburst.flush.many`: a commit's files shared by the ranks, each share flushed in threads;
* :mod:`~mpiburst.flush.orchestrate`: :func:`sync`, :func:`commit`, :func:`enqueue`.
"""

from .journal import recover
from .orchestrate import FlushReport, commit, enqueue, sync
from .writes import file_sha256

__all__ = ["FlushReport", "commit", "enqueue", "file_sha256", "recover", "sync"]
