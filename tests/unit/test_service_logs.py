"""JSON log lines and secret masking of the long-running commands (ledger.service)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from ledger.service import JsonFormatter, MaskingFormatter, mask_urls

DB_URL = "postgresql://ledger:p%40ss%3Aword@db1:5432,db2:5432/ledger?sslmode=require"


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter([DB_URL]))
    logger = logging.getLogger("ledger.test_service_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def test_a_json_line_carries_ts_level_logger_message_and_extras(
    logged: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = logged
    logger.warning("retry %d of %s", 3, "writing", extra={"batch": 25, "stream": "A1/ES"})
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["level"] == "WARNING"
    assert record["logger"] == "ledger.test_service_logs"
    assert record["message"] == "retry 3 of writing"
    assert record["batch"] == 25 and record["stream"] == "A1/ES"
    assert record["ts"].endswith("Z") and record["ts"][:4].isdigit()


def test_a_password_in_a_logged_url_is_masked(
    logged: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = logged
    logger.error(
        "lost the database at %s; nats at %s",
        DB_URL,
        "nats://feed:n4ts-pw@127.0.0.1:4222",
        extra={"url": "nats://s3cr3t-token@nats.example:4222"},
    )
    try:
        raise ConnectionError("password authentication failed for p@ss:word")
    except ConnectionError:
        logger.exception("cannot connect")
    text = stream.getvalue()
    for secret in ("p%40ss%3Aword", "p@ss:word", "n4ts-pw", "s3cr3t-token"):
        assert secret not in text
    first, second = (json.loads(line) for line in text.splitlines())
    assert "postgresql://ledger:***@db1:5432,db2:5432/ledger?sslmode=require" in first["message"]
    assert "nats://feed:***@127.0.0.1:4222" in first["message"]
    assert first["url"] == "nats://***@nats.example:4222"
    assert "ConnectionError" in second["exc"] and "***" in second["exc"]


def test_the_text_format_masks_too() -> None:
    record = logging.LogRecord(
        "ledger.consume", logging.INFO, __file__, 1, "at %s", ("postgresql://u:hunter2@h/d",), None
    )
    assert "hunter2" not in MaskingFormatter("%(message)s").format(record)


def test_mask_urls_leaves_a_url_without_secret_alone() -> None:
    text = "connecting to postgresql://ledger@db:5432/ledger and nats://127.0.0.1:4222"
    assert mask_urls(text) == text
    assert mask_urls("dsn host=db password=hunter2 user=u") == "dsn host=db password=*** user=u"
