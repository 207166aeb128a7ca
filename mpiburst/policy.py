"""Job data policies: IME's five keywords saying what happens to each file before and after a job.

A policy file has one rule per line, ``KEYWORD PATTERN``, and ``#`` comments::

    IN      input/mesh.h5        # prestage this file before the job
    IN      input/tables/        # ... and every file under this directory
    SYNC    results/             # copy to the BFS, keep in the tier (the default)
    PURGE   checkpoints/*.bin    # copy to the BFS, then free the tier
    RETAIN  scratch/             # leave to the automatic engine
    DISCARD tmp/                 # temporary: remove from the tier and the BFS
    PARTIAL logs/                # still being written when the job failed: publish it anyway
    BESIDE  checkpoints/         # ... or publish it beside its final name, as NAME.incomplete

A PATTERN is relative to the run's BFS root (or absolute, or a ``burst://``
URL). It matches a file when it names the file, a directory above it (so
directories are recursive), or matches it as a shell glob (``fnmatch``: ``*``
and ``?`` also match ``/``; a glob that matches a directory covers every file
under it).

``IN`` rules are used by stage-in only. For stage-out the *last* matching
``SYNC`` / ``PURGE`` / ``RETAIN`` / ``DISCARD`` rule wins (so a general rule
first and exceptions after it read naturally); a file no rule matches is
synced. Every line is checked when the file is read: a bad line is reported
with the file name and line number before anything is done.

A file that a handle still had open for writing when the job failed is
*incomplete*: a stage-out after the failure publishes it only up to the last
state the application made consistent (its last close or ``Sync``), keeps
the rest in the tier (and the run's snapshot) and lists it, unless the last
matching ``PARTIAL`` / ``BESIDE`` rule says otherwise: ``PARTIAL`` publishes
it as it stands under its final name, ``BESIDE`` as ``NAME.incomplete``
beside it (``mpiburst stage-out --incomplete`` does that for every file).
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field

from .errors import PolicyError
from .paths import SCHEME

#: The keywords, in IME's order, then those for a file still being written when the job failed.
KEYWORDS = ("IN", "SYNC", "PURGE", "RETAIN", "DISCARD", "PARTIAL", "BESIDE")
#: The keywords that decide a file's fate at stage-out.
OUT_KEYWORDS = ("SYNC", "PURGE", "RETAIN", "DISCARD")
#: The keywords that decide what a stage-out after a failure publishes of an incomplete file.
INCOMPLETE_KEYWORDS = ("PARTIAL", "BESIDE")
#: Suffix of the name an incomplete file is published under by ``BESIDE``.
INCOMPLETE_SUFFIX = ".incomplete"
#: What stage-out does to a file no rule names.
DEFAULT_ACTION = "SYNC"


@dataclass(frozen=True)
class Rule:
    """One policy line: ``keyword`` applied to files matching ``pattern``.

    ``source`` and ``line`` say where the rule came from (for messages).
    """

    keyword: str
    pattern: str
    source: str = "<command line>"
    line: int = 0

    def absolute(self, bfs_root: str) -> str:
        """Return the pattern as an absolute path pattern under ``bfs_root``."""
        text = self.pattern[len(SCHEME):] if self.pattern.startswith(SCHEME) else self.pattern
        if not text.startswith("/"):
            text = os.path.join(os.path.realpath(bfs_root), text)
        return os.path.normpath(text) if not _is_glob(text) else text.rstrip("/") or "/"

    def matches(self, path: str, bfs_root: str) -> bool:
        """Return True if the rule covers the absolute BFS path ``path``."""
        pattern = self.absolute(bfs_root)
        if path == pattern or path.startswith(pattern.rstrip("/") + "/"):
            return True
        return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, pattern + "/*")


@dataclass
class Policy:
    """An ordered list of :class:`Rule`; see the module docstring for how it decides."""

    rules: list[Rule] = field(default_factory=list)

    def action(self, path: str, bfs_root: str) -> str:
        """Return what stage-out does to ``path``: ``SYNC``, ``PURGE``, ``RETAIN`` or ``DISCARD``."""
        for rule in reversed(self.rules):
            if rule.keyword in OUT_KEYWORDS and rule.matches(path, bfs_root):
                return rule.keyword
        return DEFAULT_ACTION

    def incomplete(self, path: str, bfs_root: str) -> str | None:
        """Return what to publish of ``path`` if it is incomplete: ``PARTIAL``, ``BESIDE``, or None (keep it)."""
        for rule in reversed(self.rules):
            if rule.keyword in INCOMPLETE_KEYWORDS and rule.matches(path, bfs_root):
                return rule.keyword
        return None

    def inputs(self) -> list[Rule]:
        """Return the ``IN`` rules (what stage-in prestages)."""
        return [r for r in self.rules if r.keyword == "IN"]

    def extend(self, keyword: str, patterns: list[str]) -> None:
        """Append rules given on the command line (``-s/-p/-d LIST``); they win over the file's."""
        keyword = keyword.upper()
        if keyword not in KEYWORDS:
            raise PolicyError(f"unknown policy keyword {keyword!r}; use one of {', '.join(KEYWORDS)}.")
        for text in patterns:
            for pattern in (p.strip() for p in text.split(",")):
                if not pattern:
                    raise PolicyError(f"empty pattern in the {keyword} list {text!r}; separate paths by single commas.")
                self.rules.append(Rule(keyword, pattern))


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def parse(text: str, source: str = "<policy>") -> Policy:
    """Return the :class:`Policy` written in ``text``.

    Raises
    ------
    PolicyError
        Naming every bad line as ``source:line``: an unknown keyword, a
        missing or extra pattern, an empty glob bracket.
    """
    rules: list[Rule] = []
    errors: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        keyword = words[0].upper()
        if keyword not in KEYWORDS:
            errors.append(f"{source}:{number}: unknown keyword {words[0]!r} (use {', '.join(KEYWORDS)})")
        elif len(words) != 2:
            what = "no pattern" if len(words) == 1 else f"{len(words) - 1} patterns"
            errors.append(f"{source}:{number}: {keyword} needs exactly one pattern, got {what}")
        elif "[" in words[1] and "]" not in words[1].split("[", 1)[1]:
            errors.append(f"{source}:{number}: unclosed '[' in pattern {words[1]!r}")
        else:
            rules.append(Rule(keyword, words[1], source, number))
    if errors:
        raise PolicyError("bad policy: " + "; ".join(errors) + "; fix these lines, nothing was done.")
    return Policy(rules)


def load(path: str | os.PathLike | None) -> Policy:
    """Read and check the policy file at ``path`` (``None``: the empty policy, everything synced).

    Raises
    ------
    PolicyError
        If the file cannot be read or has a bad line.
    """
    if path is None:
        return Policy()
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise PolicyError(f"cannot read policy file {path} ({reason}); give a readable text file with -f.") from None
    return parse(text, os.fspath(path))
