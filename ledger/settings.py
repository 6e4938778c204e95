"""Settings, read from the environment (``LEDGER_*``) by pydantic-settings."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


def _default_home() -> Path:
    return Path.home() / ".local" / "share" / "position-ledger"


class Settings(BaseSettings):
    """Where the ledger keeps its data and how it projects it."""

    model_config = SettingsConfigDict(env_prefix="LEDGER_", extra="ignore")

    database_url: str | None = Field(
        default=None, description="A plain postgresql:// URL; unset means the embedded cluster"
    )
    read_url: str | None = Field(
        default=None,
        description="A hot standby for read-only queries (positions, pnl, history, trail, "
        "explain, report, verify's reads); unset means the primary",
    )
    home: Path = Field(default_factory=_default_home, description="The embedded cluster's home")
    history_retention_days: int = Field(default=30, ge=0)
    session_start: str | None = Field(
        default=None,
        description="Trading-day boundary, e.g. '17:00 America/Chicago'; unset means UTC dates",
    )
    batch_size: int = Field(default=1000, ge=1, le=50_000)
