"""The public namespace: ``__all__`` is complete, each of its names loads, and type checkers see each one.

What a user's mypy makes of the names (typed, not ``Any``) is checked by
.ci/lint on tests/typing/public_api.py; here, that every lazily loaded name
has the import that gives type checkers its type.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import mpiburst
import mpiburst.errors

INIT = Path(mpiburst.__file__)


def test_every_name_in_all_resolves():
    for name in mpiburst.__all__:
        assert getattr(mpiburst, name) is not None, name
    assert len(set(mpiburst.__all__)) == len(mpiburst.__all__)


def test_every_public_error_is_exported_as_itself():
    errors = {name for name, value in vars(mpiburst.errors).items()
              if inspect.isclass(value) and issubclass(value, BaseException) and not name.startswith("_")
              and value.__module__ == "mpiburst.errors"}
    assert {"TierConnectionError", "NodeLostError", "OffsetError", "DeviceBufferError"} <= errors
    assert errors - set(mpiburst.__all__) == set()
    for name in errors:
        assert getattr(mpiburst, name) is getattr(mpiburst.errors, name)


def test_commit_is_public_as_documented():
    from mpiburst.flush import commit

    assert mpiburst.commit is commit
    assert "mpiburst.commit" in (Path(__file__).parent.parent / "docs" / "jobs.md").read_text()


def test_every_lazy_name_is_imported_for_type_checkers():
    """A name that ``__getattr__`` loads but no ``if TYPE_CHECKING:`` import names reads as Any to mypy."""
    tree = ast.parse(INIT.read_text())
    checking = next(node for node in tree.body if isinstance(node, ast.If)
                    and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
    typed = {alias.asname or alias.name for node in checking.body for alias in node.names}
    defined = {alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
               for alias in node.names} | {"__version__"}
    assert set(mpiburst.__all__) - defined == typed


def test_import_stays_cheap():
    """The TYPE_CHECKING imports stay out of a plain import: no MPI, no numpy."""
    code = "import sys, mpiburst; print(sorted(m for m in ('mpi4py', 'numpy', 'mpiburst.file') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_every_docstring_reference_to_mpiburst_resolves():
    """``:class:`mpiburst.x.Y``` and the like in the package name things that exist (the store's pointed nowhere)."""
    import importlib
    import re

    broken = []
    for path in INIT.parent.rglob("*.py"):
        for match in re.finditer(r":(?:class|func|meth|mod|data|attr|exc):`~?(mpiburst(?:\.\w+)+)`", path.read_text()):
            parts = match.group(1).split(".")
            for i in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:i]))
                except ImportError:
                    continue
                try:
                    for part in parts[i:]:
                        obj = getattr(obj, part)
                except AttributeError:
                    broken.append(f"{path.name}: {match.group(1)}")
                break
    assert not broken, broken
