"""A time without a zone is refused by every query, as ingest refuses a naive occurred_at."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from cli_testing import instrument, invoke, seed

from ledger import Ledger

ES = "CON.F.US.EP.Z26"
NAIVE = "2026-11-23T14:32:00"

COMMANDS = [
    ("positions", "--as-of"),
    ("positions", "--as-known-at"),
    ("pnl", "--as-of"),
    ("pnl", "--as-known-at"),
    ("history", "--as-of"),
    ("history", "--to"),
    ("trail", "--as-of"),
    ("explain", "--as-known-at"),
    ("reconcile", "--cutoff"),
    ("report", "--as-known-at"),
]
NEEDS = {
    "history": ["--account", "ACC-1", "--contract", ES],
    "trail": ["--account", "ACC-1", "--contract", ES],
    "explain": ["--account", "ACC-1", "--contract", ES],
}


@pytest.mark.parametrize(("command", "option"), COMMANDS)
def test_a_naive_time_is_refused_in_one_line_naming_the_option_and_value(
    cli_env: dict[str, str], db_url: str, tmp_path: Path, command: str, option: str
) -> None:
    seed(db_url, [instrument(ES, "0.25", "12.50")])
    needs = {**NEEDS, "report": ["--date", "2026-11-23", "--out", str(tmp_path / "eod")]}
    result = invoke(command, *needs.get(command, []), option, NAIVE)
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert option in lines[0] and NAIVE in lines[0] and "no time zone" in lines[0]
    # the same time with a zone is accepted (the command runs past its options)
    aware = invoke(command, *needs.get(command, []), option, NAIVE + "Z")
    assert "no time zone" not in aware.output


def test_a_zone_or_a_date_is_accepted(cli_env: dict[str, str], db_url: str) -> None:
    seed(db_url, [instrument(ES, "0.25", "12.50")])
    for value in (NAIVE + "Z", NAIVE + "+01:00", "2026-11-23"):
        result = invoke("positions", "--as-of", value, "--format", "json")
        assert result.exit_code == 0, (value, result.output)


async def test_the_api_refuses_a_naive_datetime_naming_the_argument(db_url: str) -> None:
    naive = datetime(2026, 11, 23, 14, 32)
    async with await Ledger.connect(db_url) as ledger:
        await ledger.ingest([instrument(ES, "0.25", "12.50")])
        with pytest.raises(ValueError, match=r"as_of: 2026-11-23T14:32:00 has no time zone"):
            await ledger.positions(as_of=naive)
        with pytest.raises(ValueError, match=r"as_known_at: .* has no time zone"):
            await ledger.pnl(as_known_at=naive)
        with pytest.raises(ValueError, match=r"cutoff: .* has no time zone"):
            await ledger.reconcile(cutoff=naive)
        with pytest.raises(ValueError, match=r"as_known_at: .* has no time zone"):
            await ledger.report(date(2026, 11, 23), as_known_at=naive)
        assert await ledger.positions(as_of=naive.replace(tzinfo=UTC)) == []
