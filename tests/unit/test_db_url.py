"""Database URLs: one host or a cluster's several, the driver's forms, passwords masked."""

from __future__ import annotations

import asyncpg
import pytest

from ledger.db import (
    DatabaseURL,
    Reconnect,
    async_url,
    connect_failure,
    is_transient,
    mask_secrets,
    plain_url,
    redact,
)
from ledger.errors import DatabaseUnavailable, InvalidDatabaseURL

CLUSTER = "postgresql://app:pw@10.0.0.1:5432,10.0.0.2:5433/ledger?target_session_attrs=read-write"


def test_a_multi_host_url_becomes_sqlalchemys_host_list_and_back() -> None:
    sa = async_url(CLUSTER)
    assert sa == (
        "postgresql+asyncpg://app:pw@/ledger?host=10.0.0.1:5432&host=10.0.0.2:5433"
        "&target_session_attrs=read-write"
    )
    assert plain_url(sa) == CLUSTER
    parsed = DatabaseURL.parse(sa)
    assert parsed.multi_host and parsed.hosts == ("10.0.0.1:5432", "10.0.0.2:5433")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://ledger@127.0.0.1:5432/ledger",
        "postgresql://ledger@/ledger?host=/var/run/postgresql",
        "postgres://u:p%40ss@db.example:6432/x?sslmode=require",
    ],
)
def test_a_single_host_url_keeps_its_form(url: str) -> None:
    rest = url.split("://", 1)[1]
    assert async_url(url) == "postgresql+asyncpg://" + rest
    assert plain_url(url) == "postgresql://" + rest
    assert not DatabaseURL.parse(url).multi_host


def test_a_url_of_another_scheme_is_refused_with_its_password_masked() -> None:
    with pytest.raises(InvalidDatabaseURL) as info:
        async_url("mysql://admin:S3CRETPW@db:3306/ledger")
    assert "S3CRETPW" not in str(info.value)
    assert "mysql://admin:***@db:3306/ledger" in str(info.value)


def test_passwords_are_masked_in_the_user_part_and_the_query() -> None:
    assert redact(CLUSTER) == CLUSTER.replace("app:pw@", "app:***@")
    assert redact("postgresql://u@h/db?password=x&a=b") == "postgresql://u@h/db?password=***&a=b"
    assert mask_secrets("auth for p@ss failed", "postgresql://u:p%40ss@h/db") == (
        "auth for *** failed"
    )


def test_what_counts_as_a_lost_database() -> None:
    assert is_transient(ConnectionRefusedError(111, "refused"))
    assert is_transient(asyncpg.exceptions.AdminShutdownError("terminating"))
    assert is_transient(asyncpg.exceptions.CannotConnectNowError("starting up"))
    assert is_transient(asyncpg.exceptions.ReadOnlySQLTransactionError("read-only"))
    assert is_transient(asyncpg.InternalClientError("cannot switch to state 12"))
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = asyncpg.exceptions.ConnectionDoesNotExistError("closed")
    assert is_transient(wrapped)
    assert not is_transient(asyncpg.exceptions.UniqueViolationError("duplicate"))
    assert not is_transient(ValueError("bad data"))


def test_a_refused_login_is_one_line_but_not_retried() -> None:
    exc = asyncpg.exceptions.InvalidAuthorizationSpecificationError('role "x" does not exist')
    assert not is_transient(exc)
    line = connect_failure(exc, "postgresql://x:S3CRETPW@h:5432/db")
    assert line is not None and "S3CRETPW" not in line and "x:***@h:5432" in line
    assert connect_failure(ValueError("bad"), None) is None


def test_the_retry_gives_up_past_its_window() -> None:
    policy = Reconnect("testing", window=0.0)
    assert policy.failed(ConnectionResetError()) == pytest.approx(0.1)
    with pytest.raises(DatabaseUnavailable, match="gave up testing after 2 attempts"):
        policy.failed(ConnectionResetError())
