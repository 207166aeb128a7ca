"""docs/reliability.md stays honest: every test it cites exists.

The page promises "a promise without a test is not listed here"; a test that
was renamed or removed would leave a promise citing nothing. Names are read
as ``FILE.py::NAME`` (optionally ``::Class::name`` and a ``[param]``), and a
bare ``::NAME`` continues the file cited last before it (the tables list
several tests of one file that way). Each name must be a function (or class
method) defined in that file, found with ``ast`` without importing it, and a
``[param]`` id must appear in the file's text.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "reliability.md"

#: ``tests/x.py::a::b[p]``, ``mpiburst/testing/store.py::C::t``, or a bare ``::t`` (same file as before).
_CITE = re.compile(r"((?:tests|mpiburst)/[\w/]+\.py)?((?:::\w+)+)(\[[^\]]*\])?|((?:tests|mpiburst)/[\w/]+\.py)")


def _defined(path: Path) -> set[str]:
    """Return ``name`` and ``Class::name`` for every function and method defined in ``path``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            names.add(node.name)
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(f"{node.name}::{item.name}")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
    return names


def citations(text: str) -> list[tuple[str, str, str]]:
    """Return ``(file, name, param)`` for every test cited in ``text``; ``name`` is empty for a whole file."""
    found, current = [], ""
    for match in _CITE.finditer(text):
        file, name, param, whole = match.groups()
        if whole:
            current = whole
            found.append((whole, "", ""))
            continue
        if not file and not name.startswith("::test_"):
            continue                             # prose such as ``pytest tests/FILE::TEST``
        current = file or current
        assert current, f"docs/reliability.md cites {name} before naming its file"
        found.append((current, name[2:], (param or "")[1:-1]))
    return found


def test_citations_are_parsed_with_their_file():
    """The parser itself: a bare ``::name`` belongs to the file cited before it."""
    text = "`tests/a.py::t1`, `::test_2[x-y]`; `tests/FILE::TEST`, `tests/b.py` and `mpiburst/testing/s.py::C::t3`"
    assert citations(text) == [("tests/a.py", "t1", ""), ("tests/a.py", "test_2", "x-y"),
                               ("tests/b.py", "", ""), ("mpiburst/testing/s.py", "C::t3", "")]


def test_every_test_cited_in_reliability_md_exists():
    """Every test docs/reliability.md names is defined in the file it names."""
    cited = citations(DOC.read_text())
    assert len(cited) > 40                       # the page cites its tests (the parser found them)
    missing = []
    for file, name, param in cited:
        path = REPO / file
        if not path.is_file():
            missing.append(f"{file} (no such file)")
        elif name and name not in _defined(path):
            missing.append(f"{file}::{name}")
        elif param and param not in path.read_text():
            missing.append(f"{file}::{name}[{param}] (no such parameter)")
    assert not missing, "docs/reliability.md cites tests that do not exist: " + ", ".join(missing)
