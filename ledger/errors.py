"""The ledger's exceptions and the reason codes of rejected input.

Every message names the field and the value that was wrong.

::

    LedgerError
    ├── InvalidRecord            bad input; carries a RejectReason, the field and the value
    │   └── EventRejected        the store refused an event of a batch: nothing appended
    ├── StoreError               the event store refused or could not do something
    │   ├── ConcurrencyError     a stream was not at the expected version (raised at once)
    │   ├── IdempotencyConflict  an event id already holds different content
    │   ├── NotMigrated          the database has no (current) ledger schema: run `ledger db init`
    │   ├── DatabaseUnavailable  the server cannot be reached
    │   └── InvalidDatabaseURL   LEDGER_DATABASE_URL / LEDGER_READ_URL is not a postgresql:// URL
    ├── StreamFaulted            a stream's events cannot be folded: heal it with a
    │                            correction or bust of the named execution
    ├── EmbeddedPostgresError    the private cluster cannot be created or started
    │   └── ServerBinariesMissing  no initdb/pg_ctl on this machine
    ├── ConsumeError             the live feed cannot be set up
    └── ServiceError             the metrics and health endpoint cannot listen
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "ConcurrencyError",
    "ConsumeError",
    "DatabaseUnavailable",
    "EmbeddedPostgresError",
    "EventRejected",
    "IdempotencyConflict",
    "InvalidDatabaseURL",
    "InvalidRecord",
    "LedgerError",
    "NotMigrated",
    "RejectReason",
    "ServerBinariesMissing",
    "ServiceError",
    "StoreError",
    "StreamFaulted",
]


class RejectReason(StrEnum):
    """Why a record was dead-lettered instead of appended."""

    INVALID_ENCODING = "INVALID_ENCODING"
    INVALID_JSON = "INVALID_JSON"
    UNKNOWN_TYPE = "UNKNOWN_TYPE"
    INVALID_RECORD = "INVALID_RECORD"
    OFF_TICK_PRICE = "OFF_TICK_PRICE"
    UNKNOWN_INSTRUMENT = "UNKNOWN_INSTRUMENT"
    UNKNOWN_EXECUTION = "UNKNOWN_EXECUTION"
    OFF_SIZE_INCREMENT = "OFF_SIZE_INCREMENT"
    IDEMPOTENCY_CONFLICT = "IDEMPOTENCY_CONFLICT"
    RECORD_TOO_LARGE = "RECORD_TOO_LARGE"


class LedgerError(Exception):
    """Base of every error the ledger raises on purpose."""


class InvalidRecord(LedgerError):
    """An input record that cannot become an event."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class EventRejected(InvalidRecord):
    """The store refused one event of a batch; nothing of the batch was appended."""

    def __init__(self, reason: RejectReason, message: str, index: int, event_id: str) -> None:
        super().__init__(reason, f"event {index} of the batch ({event_id}): {message}")
        self.index = index
        self.event_id = event_id


class StoreError(LedgerError):
    """The event store refused an operation or could not perform it."""


class ConcurrencyError(StoreError):
    """A stream was not at the version the caller expected."""

    def __init__(self, stream: str, expected: int, actual: int | None) -> None:
        if actual is None:
            message = (
                f"stream {stream!r}: expected version {expected}, but another writer is "
                "appending to it right now"
            )
        else:
            message = (
                f"stream {stream!r}: expected version {expected}, but it is at version {actual}"
            )
        super().__init__(message)
        self.stream = stream
        self.expected = expected
        self.actual = actual


class IdempotencyConflict(StoreError):
    """An event id is already in the log with different content."""

    def __init__(self, event_id: str, stream: str, detail: str = "") -> None:
        extra = f": {detail}" if detail else ""
        super().__init__(
            f"event_id {event_id} (stream {stream!r}) is already in the log with different "
            f"content{extra}"
        )
        self.event_id = event_id
        self.stream = stream


class NotMigrated(StoreError):
    """The database has no ledger schema, or an older one."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"{detail}; run `ledger db init` to create or upgrade the schema")


class DatabaseUnavailable(StoreError):
    """The PostgreSQL server cannot be reached."""


class InvalidDatabaseURL(StoreError):
    """A database URL that is not a postgresql:// URL (its password masked in the message)."""


class EmbeddedPostgresError(LedgerError):
    """The embedded PostgreSQL cluster cannot be created, started or stopped."""


class ServerBinariesMissing(EmbeddedPostgresError):
    """No PostgreSQL server binaries (initdb, pg_ctl) were found."""


class ConsumeError(LedgerError):
    """The live feed cannot be set up (a stream that does not carry the subject, ...)."""


class ServiceError(LedgerError):
    """The metrics and health endpoint cannot listen (port taken, address not ours)."""


class StreamFaulted(LedgerError):
    """A stream holds an event that cannot be folded, so it has no position to show.

    The event got into the log without ingest's checks (an older version wrote it, or
    someone with database rights did). Every other stream is unaffected. Appending a
    correction (a price on the tick grid, a positive quantity) or a bust of the named
    execution heals the stream.

    Attributes:
        stream: the faulted stream, ``account/contract``.
        position: the global log position of the offending event.
        event_id: the offending event's id, when known.
        exec_id: the execution the offending event fills or corrects, when known.
        reason: why the event cannot be folded.
    """

    def __init__(
        self,
        stream: str,
        position: int,
        event_id: str | None,
        exec_id: str | None,
        reason: str,
    ) -> None:
        account, _, contract = stream.partition("/")
        if exec_id is not None:
            way_out = (
                f"append a correction (a price on the tick grid, a positive quantity) or a "
                f"bust of execution {exec_id!r} of account {account!r} in {contract!r} to "
                "heal it"
            )
        else:
            way_out = "append a correction or a bust of the offending execution to heal it"
        super().__init__(
            f"stream {stream!r} is faulted: the event at log position {position} "
            f"(event_id {event_id or 'unknown'}) cannot be folded: {reason}; {way_out}"
        )
        self.stream = stream
        self.position = position
        self.event_id = event_id
        self.exec_id = exec_id
        self.reason = reason
