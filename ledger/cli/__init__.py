"""The ``ledger`` command line (Typer + Rich): a thin layer over the public API.

``--format`` always names the output format. With ``LEDGER_DATABASE_URL`` unset every
command uses the embedded cluster under ``LEDGER_HOME``, creating, starting and
migrating it on first use; with it set, any command but ``ledger db init`` refuses an
unmigrated database with an error that names ``ledger db init``.

The commands live in :mod:`ledger.cli.app` (db, ingest, log, positions, pnl, ...),
:mod:`ledger.cli.audit` (reconcile, trail, explain, verify, report) and
:mod:`ledger.cli.live` (consume, stats); each registers itself on the one Typer app of
:mod:`ledger.cli.common`. This package is the only part of ``ledger`` that may import
``projections``.
"""

from __future__ import annotations

from ledger.cli import app as _core_commands
from ledger.cli import audit as _audit_commands
from ledger.cli import live as _live_commands
from ledger.cli.common import app

__all__ = ["app", "main"]

_COMMAND_MODULES = (_core_commands, _audit_commands, _live_commands)


def main() -> None:
    """Run the ``ledger`` command line."""
    app()
