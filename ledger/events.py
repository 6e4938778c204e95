"""Events: immutable, past-tense facts, one frozen pydantic model per type.

The ``type`` tag of each model is the ``type`` key of the native JSON Lines format, so a
native record validates straight into its event. ``Event`` is the discriminated union.

Each event knows its stream (``{account}/{contract}`` for trading events,
``instrument/{contract}`` for instrument data, ``reconciliation/{run_id}`` for
reconciliation runs) and derives a deterministic id from its source's own key (the
broker's execution id for fills), so re-sending an event can never append it twice.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import MAX_EMAX, MIN_EMIN, Context, Decimal
from typing import Annotated, Any, Final, Literal, TypeAlias, overload

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from ledger.errors import InvalidRecord, RejectReason
from ledger.values import (
    SIDE_OF_TEXT,
    AccountId,
    ContractId,
    ExecId,
    MoneyAmount,
    NonNegativeDecimal,
    OrderId,
    PositiveDecimal,
    Price,
    Quantity,
    Side,
    SignedQuantity,
    check_point_value,
    point_value,
)

__all__ = [
    "EVENT_TYPES",
    "BreakRecord",
    "BrokerPositionReported",
    "Event",
    "FillBusted",
    "FillCorrected",
    "FillRecorded",
    "InstrumentDefined",
    "LogSealed",
    "MarkPriceSet",
    "ReconciliationCompleted",
    "Timestamp",
    "canonical_value",
    "decimal_text",
    "decode_json",
    "describe_validation_error",
    "encode_content",
    "event_from_stored",
    "event_id_for",
    "fill_event_id",
    "parse_event",
]

_ONE = Decimal(1)


def _is_none(value: object) -> bool:
    return value is None


_ID_NAMESPACE = uuid.UUID("5b0c2f8e-6c1a-4d1e-9a57-3f6e2d8b9c01")
RESERVED_ACCOUNTS = frozenset({"instrument", "reconciliation", "seal"})


EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)
"""Timestamps before this are refused (no execution happened then; year 1 overflows)."""
LATEST = datetime(2200, 1, 1, tzinfo=UTC)
"""Timestamps at or after this are refused."""


def _aware_utc(value: object) -> datetime:
    if isinstance(value, str):
        if len(value) > 40:
            raise ValueError(f"timestamp too long: {value[:40]!r}...")
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"not an ISO-8601 timestamp: {value!r}") from None
    elif isinstance(value, datetime):
        parsed = value
    else:
        raise ValueError(f"expected an ISO-8601 timestamp string, got {type(value).__name__}")
    if parsed.tzinfo is UTC:
        utc: datetime | None = parsed  # (what astimezone(UTC) returns for it: itself)
    elif parsed.tzinfo is None or parsed.utcoffset() is None:
        raise ValueError(f"timestamp {value!s} has no time zone (naive timestamps are refused)")
    else:
        try:
            utc = parsed.astimezone(UTC)
        except OverflowError:  # 0001-01-01T00:00+01:00 has no UTC time a datetime holds
            utc = None
    if utc is None or not EARLIEST <= utc < LATEST:
        raise ValueError(
            f"timestamp {value!s} is out of range (from {EARLIEST.date()} to before "
            f"{LATEST.date()}, UTC)"
        )
    return utc


Timestamp = Annotated[datetime, BeforeValidator(_aware_utc)]
"""A time-zone-aware timestamp, normalized to UTC."""


def _side(value: object) -> Side:
    if isinstance(value, Side):
        return value
    if isinstance(value, str) and (side := SIDE_OF_TEXT.get(value.upper())) is not None:
        return side
    raise ValueError(f"side must be BUY or SELL, got {value!r}")


def _not_reserved(value: str) -> str:
    if value.lower() in RESERVED_ACCOUNTS:
        raise ValueError(f"account {value!r} is a reserved stream prefix")
    return value


TradingAccount = Annotated[AccountId, AfterValidator(_not_reserved)]
SideField = Annotated[Side, BeforeValidator(_side)]


_NAMESPACE_BYTES = _ID_NAMESPACE.bytes


def event_id_for(kind: str, natural_key: str) -> str:
    """Return the deterministic id of the event of type ``kind`` with ``natural_key``.

    This is ``uuid.uuid5(namespace, f"{kind}|{natural_key}")`` (:func:`compute_event_id`),
    remembered: an event's id is asked for more than once on its way into the log (the
    batch's checks, then the append).
    """
    name = f"{kind}|{natural_key}"
    known = _IDS.get(name)
    if known is None:
        known = _uuid5_text(name)
        if len(_IDS) >= _IDS_MAX:
            _IDS.clear()
        _IDS[name] = known
    return known


def compute_event_id(kind: str, natural_key: str) -> str:
    """:func:`event_id_for`, computed afresh (for reads that see each id once)."""
    return _uuid5_text(f"{kind}|{natural_key}")


def _uuid5_text(name: str) -> str:
    """``str(uuid.uuid5(namespace, name))``, spelled out because the ``uuid`` module's
    version costs several microseconds an event on the append path."""
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name.encode()).digest())
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest[:16].hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# The latest ids, computed once. Bounded; ids never change.
_IDS: dict[str, str] = {}
_IDS_MAX = 65_536


def fill_event_id(account: str, exec_id: str) -> str:
    """Return the id of the fill ``exec_id`` of ``account`` (what busts and corrections name)."""
    return event_id_for("fill", f"{account}|{exec_id}")


class _EventBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)

    schema_version: Literal[1] = Field(default=1, exclude=True)

    @property
    def stream(self) -> str:
        """Return the stream this event belongs to."""
        raise NotImplementedError

    def natural_key(self) -> str:
        """Return the source's own key for this event (the basis of its id)."""
        raise NotImplementedError

    @property
    def event_id(self) -> str:
        """Return the deterministic event id (a UUIDv5 of type and natural key)."""
        kind: str = getattr(self, "type")  # noqa: B009 - every subclass defines it
        return event_id_for(kind, self.natural_key())

    @property
    def occurred(self) -> datetime:
        """Return the broker's time of the event."""
        return getattr(self, "occurred_at")  # type: ignore[no-any-return]  # noqa: B009

    def payload(self) -> dict[str, Any]:
        """Return the JSON payload: decimals as strings, timestamps as ISO-8601 UTC."""
        return self.model_dump(mode="json")


class InstrumentDefined(_EventBase):
    """A contract's tick grid and value: point value = tick value / tick size.

    ``size_increment`` is the granularity of a fill's quantity: a futures contract
    trades in whole contracts, the default (None means 1, and keeps the payload of an
    instrument defined before the field existed unchanged).
    """

    type: Literal["instrument"] = "instrument"
    contract: ContractId
    tick_size: PositiveDecimal
    tick_value: PositiveDecimal
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] = "USD"
    occurred_at: Timestamp | None = None
    size_increment: Annotated[PositiveDecimal | None, Field(exclude_if=_is_none)] = None

    @model_validator(mode="after")
    def _carried_exactly(self) -> InstrumentDefined:
        check_point_value(self.tick_value, self.tick_size)
        return self

    @property
    def stream(self) -> str:
        return f"instrument/{self.contract}"

    def natural_key(self) -> str:
        return self.contract

    @property
    def point_value(self) -> Decimal:
        """Return the money value of one whole point of price."""
        return point_value(self.tick_value, self.tick_size)

    @property
    def quantity_step(self) -> Decimal:
        """Return the size increment a fill's quantity must be a multiple of."""
        return _ONE if self.size_increment is None else self.size_increment


class FillRecorded(_EventBase):
    """An execution: the account bought or sold ``qty`` at ``price``."""

    type: Literal["fill"] = "fill"
    account: TradingAccount
    contract: ContractId
    exec_id: ExecId
    order_id: OrderId | None = None
    side: SideField
    qty: Quantity
    price: Price
    fee: NonNegativeDecimal = Decimal(0)
    occurred_at: Timestamp
    broker_pnl: MoneyAmount | None = None
    """The broker's own P&L figure for the fill: evidence for reconciliation only."""

    @property
    def stream(self) -> str:
        return f"{self.account}/{self.contract}"

    def natural_key(self) -> str:
        return f"{self.account}|{self.exec_id}"


class FillBusted(_EventBase):
    """The broker voided execution ``exec_id``."""

    type: Literal["bust"] = "bust"
    account: TradingAccount
    contract: ContractId
    exec_id: ExecId
    occurred_at: Timestamp

    @property
    def stream(self) -> str:
        return f"{self.account}/{self.contract}"

    def natural_key(self) -> str:
        return f"{self.account}|{self.exec_id}"


class FillCorrected(_EventBase):
    """Execution ``exec_id`` now has this quantity, price and fee."""

    type: Literal["correction"] = "correction"
    account: TradingAccount
    contract: ContractId
    exec_id: ExecId
    qty: Quantity
    price: Price
    fee: NonNegativeDecimal = Decimal(0)
    occurred_at: Timestamp

    @property
    def stream(self) -> str:
        return f"{self.account}/{self.contract}"

    def natural_key(self) -> str:
        return f"{self.account}|{self.exec_id}|{self.occurred_at.isoformat()}"


class BrokerPositionReported(_EventBase):
    """The broker says the account holds ``signed_qty`` at ``avg_price`` at ``occurred_at``."""

    type: Literal["broker_position"] = "broker_position"
    account: TradingAccount
    contract: ContractId
    signed_qty: SignedQuantity
    avg_price: Price | None = None
    occurred_at: Timestamp

    @property
    def stream(self) -> str:
        return f"{self.account}/{self.contract}"

    def natural_key(self) -> str:
        return f"{self.account}|{self.contract}|{self.occurred_at.isoformat()}"


class MarkPriceSet(_EventBase):
    """A mark or settlement price for a contract at ``occurred_at``."""

    type: Literal["mark"] = "mark"
    contract: ContractId
    price: Price
    occurred_at: Timestamp

    @property
    def stream(self) -> str:
        return f"instrument/{self.contract}"

    def natural_key(self) -> str:
        return f"{self.contract}|{self.occurred_at.isoformat()}"


class BreakRecord(BaseModel):
    """One reconciliation break, as kept in a ``ReconciliationCompleted`` event."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    break_id: str
    type: str
    account: AccountId
    contract: ContractId
    ledger_value: str | None = None
    broker_value: str | None = None
    difference: str | None = None
    tolerance: str | None = None
    exec_ids: tuple[str, ...] = ()
    detail: str = ""


class ReconciliationCompleted(_EventBase):
    """A reconciliation run at ``cutoff`` and the breaks it found."""

    type: Literal["reconciliation"] = "reconciliation"
    run_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
    cutoff: Timestamp
    source: str = "broker_position"
    matched: int
    breaks: tuple[BreakRecord, ...] = ()
    occurred_at: Timestamp

    @property
    def stream(self) -> str:
        return f"reconciliation/{self.run_id}"

    def natural_key(self) -> str:
        return self.run_id


class LogSealed(_EventBase):
    """A seal over the log's read order up to ``through_position`` (tamper evidence).

    ``formula`` says what each event adds to the digest (see :mod:`ledger.integrity`):
    None (the first formula) its position, id and hash; 2 also every column the hash
    chain does not cover (type, record time, transaction id, ...).
    """

    type: Literal["seal"] = "seal"
    through_position: int
    event_count: int
    digest: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    occurred_at: Timestamp
    formula: Annotated[Literal[2] | None, Field(exclude_if=_is_none)] = None

    @property
    def stream(self) -> str:
        return "seal/log"

    def natural_key(self) -> str:
        return f"{self.through_position}|{self.digest}"


Event: TypeAlias = Annotated[
    InstrumentDefined
    | FillRecorded
    | FillBusted
    | FillCorrected
    | BrokerPositionReported
    | MarkPriceSet
    | ReconciliationCompleted
    | LogSealed,
    Field(discriminator="type"),
]

EVENT_TYPES: dict[str, type[_EventBase]] = {
    "instrument": InstrumentDefined,
    "fill": FillRecorded,
    "bust": FillBusted,
    "correction": FillCorrected,
    "broker_position": BrokerPositionReported,
    "mark": MarkPriceSet,
    "reconciliation": ReconciliationCompleted,
    "seal": LogSealed,
}
# Types a broker or an operator may send; the others are written by the ledger itself.
INPUT_TYPES = frozenset({"instrument", "fill", "bust", "correction", "broker_position", "mark"})

_EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number the ledger accepts")


def decode_json(text: str | bytes) -> Any:
    """Decode JSON with every non-integer number as an exact ``Decimal``.

    orjson decodes first (about 5x faster than ``json``); a document it cannot decode,
    or in which it found a non-integer number (a float, never kept: its text may not
    survive a float) or an integer beyond 64 bits (which it makes a float), is decoded
    again by ``json`` with ``Decimal`` numbers, whose result and errors are the
    reference (``tests/property/test_decode_json.py``).

    Raises:
        ValueError: the text is not JSON, holds NaN/Infinity, or a number no Decimal holds.
    """
    try:
        value = orjson.loads(text)
        if not _holds_float(value):
            return value
    except (orjson.JSONDecodeError, RecursionError):
        pass
    try:
        return json.loads(text, parse_float=Decimal, parse_constant=_reject_constant)
    except ArithmeticError as exc:  # e.g. 1e99999999999999999999
        raise ValueError(f"a number in the record is out of range: {exc!r}") from None


def _holds_float(value: Any) -> bool:
    kind = type(value)
    if kind is float:
        return True
    if kind is dict:
        return any(type(v) in _NESTED_OR_FLOAT and _holds_float(v) for v in value.values())
    if kind is list:
        return any(type(v) in _NESTED_OR_FLOAT and _holds_float(v) for v in value)
    return False


_NESTED_OR_FLOAT: Final = frozenset({float, dict, list})


def describe_validation_error(error: ValidationError) -> str:
    """Render a pydantic error as ``field: problem (got value)`` lines, one per problem."""
    parts = []
    for item in error.errors(include_url=False):
        field = ".".join(str(p) for p in item["loc"] if p not in _EVENT_TYPES_TAGS) or "record"
        value = item.get("input")
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] in ("missing",):
            parts.append(f"{field}: required key is missing")
        elif item["type"] == "extra_forbidden":
            parts.append(f"{field}: unexpected key (value {shown})")
        else:
            parts.append(f"{field}: {message} (got {shown})")
    return "; ".join(parts)


_EVENT_TYPES_TAGS = set(EVENT_TYPES)


def parse_event(record: object, *, allow_internal: bool = False) -> Event:
    """Validate one decoded record (native keys) into its event.

    Args:
        record: the decoded JSON object.
        allow_internal: also accept the types the ledger writes itself
            (reconciliation, seal); input from outside never may.

    Raises:
        InvalidRecord: with ``UNKNOWN_TYPE`` or ``INVALID_RECORD`` and a message naming
            each bad field and its value.
    """
    if not isinstance(record, Mapping):
        raise InvalidRecord(
            RejectReason.INVALID_RECORD, f"expected a JSON object, got {type(record).__name__}"
        )
    kind = record.get("type")
    allowed = EVENT_TYPES.keys() if allow_internal else INPUT_TYPES
    if not isinstance(kind, str) or kind not in allowed:
        raise InvalidRecord(
            RejectReason.UNKNOWN_TYPE,
            f"type: unknown event type {kind!r} (expected one of {', '.join(sorted(allowed))})",
        )
    try:
        return _EVENT_ADAPTER.validate_python(record)
    except ValidationError as exc:
        raise InvalidRecord(RejectReason.INVALID_RECORD, describe_validation_error(exc)) from None


def event_from_stored(payload: Mapping[str, Any]) -> Event:
    """Rebuild an event from a payload read back from the log (already validated once)."""
    return _EVENT_ADAPTER.validate_python(payload)


_EXACT = Context(prec=100, Emax=MAX_EMAX, Emin=MIN_EMIN)


def canonical_value(value: Any) -> Any:
    """Return ``value`` with decimals normalized and timestamps in UTC ISO form."""
    kind = type(value)
    if kind is str or value is None or kind is int or kind is bool:
        return value
    if kind is Decimal:
        # 5000.25 and 5000.250 are the same price: compare numbers, not spellings.
        # (in a context wide enough that no admitted number is rounded: the default
        # 28 digits would make two different 30-digit prices the same content)
        normalized = value.normalize(_EXACT)
        return format(normalized, "f") if normalized != 0 else "0"
    if kind is dict:
        return {
            k: v if v is None or type(v) is str else canonical_value(v) for k, v in value.items()
        }
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, list | tuple):
        return [canonical_value(v) for v in value]
    if isinstance(value, Side):
        return value.value
    return value


@overload
def decimal_text(value: Decimal) -> str: ...
@overload
def decimal_text(value: Decimal | None) -> str | None: ...
def decimal_text(value: Decimal | None) -> str | None:
    """Return a number as the ledger writes it in messages and files (canonical), or None."""
    if value is None:
        return None
    text: str = canonical_value(value)
    return text


def encode_content(event: _EventBase) -> tuple[str, bytes]:
    """Return an event's payload JSON and its canonical JSON, in one pass over its fields.

    The payload keeps every number as it was written (``4.50`` stays ``4.50``); the
    canonical form, with sorted keys, normalized numbers and UTC timestamps, is what the
    content digest covers, so ``5000.25`` and ``5000.250`` are the same content. Events of
    flat fields (every input event) skip pydantic's serializer; the rest go through it.
    """
    payload: dict[str, Any] = {}
    canonical: dict[str, Any] = {}
    for key, value in event.__dict__.items():  # the fields, in declaration order
        kind = type(value)
        if kind is Decimal:
            text = payload[key] = str(value)
            # already canonical unless it has an exponent, a trailing zero after the
            # point, or is minus zero (most prices are written canonically)
            if "E" in text or (text[-1] == "0" and "." in text) or text == "-0":
                text = canonical_value(value)
            canonical[key] = text
        elif kind is str or value is None or kind is Side or kind is int or kind is bool:
            payload[key] = canonical[key] = value  # (orjson writes a Side as its value)
        elif kind is datetime and value.tzinfo is UTC:  # orjson writes it as isoformat()
            payload[key] = canonical[key] = value
        else:  # nested records, other zones: let pydantic and canonical_value lay them out
            data = event.model_dump(mode="python")
            return (
                orjson.dumps(data, default=_json_default).decode(),
                orjson.dumps(canonical_value(data), option=orjson.OPT_SORT_KEYS),
            )
    del payload["schema_version"], canonical["schema_version"]  # a column, not content
    for key in _OMITTED_WHEN_NONE:  # fields added later: absent means the default
        if key in payload and payload[key] is None:
            del payload[key], canonical[key]
    return orjson.dumps(payload).decode(), orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)


# Fields added after the first release: None is the default and stays out of the
# payload (``exclude_if``), so the content digest of an older event does not change.
_OMITTED_WHEN_NONE = ("size_increment", "formula")


def _json_default(value: object) -> object:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, Side):
        return value.value
    raise TypeError(f"cannot encode {type(value).__name__} in an event payload")
