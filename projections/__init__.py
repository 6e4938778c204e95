"""Projections of the event log: positions, realized P&L and position history.

``positions`` and ``pagefold`` may be compiled to C by mypyc at install time
(``setup.py``). A compiled build older than its source (the source was edited or
checked out since ``bash scripts/setup`` last ran) is not used, nor any build when
``LEDGER_PURE_PYTHON`` is set: both modules are then loaded from source, together,
since the compiled ones call each other directly.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

__all__ = ["COMPILED", "compiled_build", "running_compiled"]

COMPILED = ("positions", "pagefold")
"""The modules ``setup.py`` compiles, in import order (keep the two lists in step)."""

_HERE = Path(__file__).resolve().parent


def compiled_build(directory: Path = _HERE) -> bool:
    """Return whether ``directory`` holds a compiled build of every module in
    :data:`COMPILED` that is at least as new as its source."""
    for name in COMPILED:
        source = directory / f"{name}.py"
        builds = list(directory.glob(f"{name}.*.so"))
        if not builds or not source.exists():
            return False
        if min(b.stat().st_mtime for b in builds) < source.stat().st_mtime:
            return False
    return True


def running_compiled() -> bool:
    """Return whether the imported fold modules are the compiled ones."""
    from projections import pagefold, positions

    return all(not str(m.__file__).endswith(".py") for m in (positions, pagefold))


def _load_sources() -> None:
    """Import the modules of :data:`COMPILED` from their ``.py`` files."""
    for name in COMPILED:
        qualified = f"{__name__}.{name}"
        if qualified in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(qualified, _HERE / f"{name}.py")
        if spec is None or spec.loader is None:  # pragma: no cover - the file is ours
            raise ImportError(f"cannot load {qualified} from source")
        module = importlib.util.module_from_spec(spec)
        sys.modules[qualified] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[qualified]
            raise
        setattr(sys.modules[__name__], name, module)


if any(_HERE.glob("*.so")) and (os.environ.get("LEDGER_PURE_PYTHON") or not compiled_build()):
    _load_sources()
