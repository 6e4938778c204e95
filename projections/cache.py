"""The runner's memory of the streams, and the fold of one page of the log into it.

:class:`StreamCache` holds what folding needs between pages: the position state of
every recently seen stream (least recently used first, bounded by ``cache_size``; a
state not in memory is loaded from the projection), the instruments, the faulted
streams, and the restatement journal. A fill in event order is folded incrementally
(:func:`projections.pagefold.fold_rows`); a late fill, a bust or a correction restates
its stream: the stream is replayed from its journal (every row of it this drain has
folded, trimmed behind its restart marks) or else from the log, and rewrites its history
and daily P&L from its first changed fill. A stream that cannot be folded is set aside
as faulted (:mod:`projections.faults`) until a row of its own lets it replay.

No writes here: :mod:`projections.writer` writes what :meth:`StreamCache._fold` returns.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import orjson

from ledger.settings import Settings
from ledger.store import INSTRUMENTS_SQL, Checkpoint, LightRow
from ledger.values import instrument_grid_of
from projections import store as sql
from projections.faults import UNFOLDABLE, culprit_in_rows
from projections.pagefold import (
    E_OCCURRED_AT,
    E_POSITION,
    MARK_EVERY,
    R_RECORDED_AT,
    FoldScope,
    Marks,
    Page,
    PositionColumns,
    Restated,
    StreamRow,
    collect,
    first_positions,
    fold_rows,
    position_columns,
    restate_stream,
    stream_row,
    trim_journal,
    uncached_streams,
)
from projections.pnl import trading_day
from projections.positions import (
    FoldError,
    PositionState,
    new_state,
)

__all__ = ["Instrument", "StreamCache", "parse_session"]

log = logging.getLogger("projections.runner")  # (the runner's log, as before the split)
_STREAM_TYPES = frozenset({"fill", "bust", "correction"})
_JOURNAL_ROWS = 250_000
_YIELD_EVERY = 512  # rows folded between chances for other tasks to run


@dataclass(frozen=True, slots=True)
class Instrument:
    """What the folds need to know about a contract."""

    point_value: Decimal
    tick_size: Decimal
    currency: str


def parse_session(value: str | None) -> tuple[time | None, ZoneInfo | None]:
    """Parse ``LEDGER_SESSION_START`` (``"17:00 America/Chicago"``) into time and zone.

    Raises:
        ValueError: the value is not ``HH:MM`` optionally followed by an IANA zone name.
    """
    if not value:
        return None, None
    parts = value.split()
    try:
        start = time.fromisoformat(parts[0])
        zone = ZoneInfo(parts[1]) if len(parts) > 1 else None
    except (ValueError, KeyError, IndexError) as exc:
        raise ValueError(
            f"LEDGER_SESSION_START must be 'HH:MM [Area/City]', got {value!r}: {exc}"
        ) from None
    return start, zone


class StreamCache:
    """Cached stream states, the restatement journal, and the fold of a page into them."""

    def __init__(
        self,
        settings: Settings,
        *,
        snapshot_every: int = 64,
        cache_size: int = 50_000,
    ) -> None:
        self.settings = settings
        self.snapshot_every = snapshot_every
        self.cache_size = cache_size
        self.session_start, self.session_tz = parse_session(self.settings.session_start)
        self._utc_days = self.session_start is None and self.session_tz is None
        self._instruments: dict[str, Instrument] = {}
        self._cache: OrderedDict[str, PositionState] = OrderedDict()
        # per cached stream: the latest recorded_at of the events its state holds
        self._known: dict[str, datetime] = {}
        self._cache_key: tuple[int, int, int] | None = None  # (generation, tx, position)
        # Restating from memory: while a drain that began at the start of the log keeps
        # its cache, every fill, bust and correction of a stream passed through _fold, so
        # a restatement can replay them from here instead of reading the stream back.
        # None: off. Streams evicted from the cache or over the row budget are "lost"
        # and restate from the log as before. Bounded by journal_rows rows in all.
        self.journal_rows = _JOURNAL_ROWS
        self._journal: dict[str, list[StreamRow]] | None = None
        self._journal_lost: set[str] = set()
        # per journaled stream: states after every MARK_EVERYth fill, so a restatement
        # replays and rewrites from the last mark before its change (None with no journal)
        self._marks: dict[str, Marks] | None = None
        self.mark_every = MARK_EVERY
        self._journal_size = 0
        # Faulted streams of the generation being folded (projections.faults): set aside
        # until a row of theirs (a correction or bust) lets them replay. None: not loaded.
        self._faulted: set[str] | None = None

    def _forget_cache(self) -> None:
        self._cache.clear()
        self._known.clear()
        self._cache_key = None
        self._journal = None
        self._marks = None
        self._journal_lost.clear()
        self._journal_size = 0
        self._faulted = None

    def _trim_cache(self, keep: set[str]) -> None:
        """Evict the least recently used states, never one the open transaction holds."""
        cache = self._cache
        excess = len(cache) - self.cache_size
        if excess <= 0:
            return
        for stream in list(cache):
            if excess <= 0:
                break
            if stream in keep:
                continue
            del cache[stream]
            self._known.pop(stream, None)
            self._journal_drop(stream)
            excess -= 1

    def _journal_trim(self) -> None:
        """Keep the journal within its row budget: forget the least recently used
        streams' rows (they restate from the log)."""
        journal = self._journal
        if journal is None or self._journal_size <= self.journal_rows:
            return
        target = self.journal_rows * 3 // 4
        for stream in list(self._cache):
            if self._journal_size <= target:
                break
            if stream in journal:
                self._journal_drop(stream)
        if self._journal_size > target:
            for stream in list(journal):
                if self._journal_size <= target:
                    break
                self._journal_drop(stream)

    def _journal_drop(self, stream: str) -> None:
        """Stop remembering ``stream``: it restates from the log from now on."""
        journal = self._journal
        if journal is None:
            return
        rows = journal.pop(stream, None)
        if rows is not None:
            self._journal_size -= len(rows)
        if self._marks is not None:
            self._marks.pop(stream, None)
        self._journal_lost.add(stream)

    async def _faulted_streams(self, conn: asyncpg.Connection, generation: int) -> set[str]:
        """Return the streams of ``generation`` held as faulted (that this runner folds)."""
        return {r[0] for r in await conn.fetch(sql.FAULTED_STREAMS, generation)}

    async def _load_instruments(self, conn: asyncpg.Connection) -> None:
        for (payload,) in await conn.fetch(INSTRUMENTS_SQL):
            self._add_instrument(orjson.loads(payload))

    def _add_instrument(self, payload: dict[str, Any]) -> None:
        point_value, tick_size = instrument_grid_of(payload)
        self._instruments.setdefault(
            payload["contract"], Instrument(point_value, tick_size, payload["currency"])
        )

    def _instrument(self, contract: str) -> Instrument:
        instrument = self._instruments.get(contract)
        if instrument is None:
            raise FoldError(
                f"contract: no instrument event defines {contract!r}, so its fills cannot be "
                "valued (ingest rejects such fills; was this event appended directly?)"
            )
        return instrument

    async def _preload(
        self, conn: asyncpg.Connection, generation: int, rows: list[LightRow]
    ) -> None:
        cache = self._cache
        wanted = uncached_streams(rows, cache)
        if not wanted:
            return
        loaded = await conn.fetch(sql.LOAD_STATES, generation, wanted)
        if not loaded:
            return
        for stream, state in loaded:
            cache[stream] = PositionState.from_json(orjson.loads(state))
        # the newest recorded_at of each loaded stream's events; erring late is safe (an
        # as-known-at query then picks an older snapshot), erring early would not be
        for stream, recorded in await conn.fetch(sql.LATEST_RECORDED, [r[0] for r in loaded]):
            self._known[stream] = recorded

    def _state(self, stream: str, account: str, contract: str) -> PositionState:
        state = self._cache.get(stream)
        if state is None:
            instrument = self._instrument(contract)
            state = new_state(account, contract, instrument.point_value, instrument.tick_size)
            self._cache[stream] = state
        return state

    def _compaction_cutoff(self) -> date:
        """Return the first trading day inside the retention window: detail history of
        the days before it is compacted into end-of-day rows."""
        cutoff = datetime.now(UTC) - timedelta(days=self.settings.history_retention_days)
        return trading_day(cutoff, self.session_start, self.session_tz)

    def _day(self, occurred_at: datetime) -> date:
        if self._utc_days and occurred_at.tzinfo is UTC:
            return occurred_at.date()
        return trading_day(occurred_at, self.session_start, self.session_tz)

    async def _fold(
        self,
        conn: asyncpg.Connection,
        generation: int,
        rows: list[LightRow],
        end: Checkpoint,
        daily: dict[str, dict[date, list[Any]]],
        dirty: set[str],
    ) -> Page:
        """Fold one page into the cached states; return what it writes.

        The page's daily P&L is added into ``daily`` and its streams into ``dirty``
        (what the open transaction writes when it commits: see ``Flush``).
        """
        if not self._instruments:
            await self._load_instruments(conn)
        if self._faulted is None:
            self._faulted = await self._faulted_streams(conn, generation)
        await self._preload(conn, generation, rows)
        page = Page(end)
        if self._faulted:
            self._retry_faulted(page, rows)
        scope = self._scope()
        journaled = 0
        for lo in range(0, len(rows), _YIELD_EVERY):
            if lo:
                # let the writer's round trips (COPY of the previous page) go on while
                # this page folds, rather than all wait for the end of the page
                await asyncio.sleep(0)
            journaled += fold_rows(scope, page, rows, lo, min(lo + _YIELD_EVERY, len(rows)))
        if self._journal is not None:
            self._journal_size += journaled
        if page.restate:
            await self._restate(conn, page, rows)
        self._journal_trim()
        collect(page, generation, self._cache, daily, dirty, self._utc_days, self._day)
        for stream in page.faults:
            # what earlier pages of the transaction did to it is wiped with it
            dirty.discard(stream)
            daily.pop(stream, None)
        return page

    def _scope(self) -> FoldScope:
        """What folding a page reads and updates of this cache (``fold_rows``)."""
        return FoldScope(
            self._cache,
            self._known,
            self._journal,
            self._journal_lost,
            self.snapshot_every,
            self._state,
            self._add_instrument,
            self._marks,
            self._utc_days,
            self._day,
            self.mark_every,
        )

    def _retry_faulted(self, page: Page, rows: list[LightRow]) -> None:
        """Send every faulted stream with a row in ``rows`` (or whose contract an
        instrument row defines) to a replay of the whole stream: a correction or bust
        of the offending execution heals it; anything else leaves it faulted."""
        faulted = self._faulted
        assert faulted is not None
        restate = page.restate
        defined: set[str] = set()
        for row in rows:
            stream = row.stream
            if stream in faulted:
                if row.type in _STREAM_TYPES and stream not in restate:
                    restate[stream] = row.global_position
            elif row.type == "instrument":
                defined.add(orjson.loads(row.payload)["contract"])
        if defined:
            for stream in faulted:
                if stream not in restate and stream.split("/", 1)[1] in defined:
                    restate[stream] = page.end.position

    async def _restate(self, conn: asyncpg.Connection, page: Page, rows: list[LightRow]) -> None:
        """Replay every stream of ``page.restate`` up to the page's end, from its journal
        or else from the log, rewriting its history and daily P&L from the first fill
        that changed, or from the last mark before it (see ``restate_stream``)."""
        streams = sorted(page.restate)
        journal = self._journal
        lost = self._journal_lost
        marks_of = self._marks
        first_new = first_positions(rows, page.restate)  # the first row of each in this page
        floor = self._compaction_cutoff()
        faulted = self._faulted or set()
        for stream in streams:
            if stream in faulted:
                # a faulted stream has no rows left: it replays whole, from the log
                first_new[stream] = -1
                self._journal_drop(stream)
        # every row of a journaled stream up to the page's end went through _fold: the
        # journal holds them all, or (trimmed) all that a replay from a mark needs
        from_log = streams if journal is None else [s for s in streams if s in lost]
        if journal is not None and marks_of is not None:
            for stream in streams:
                if stream in lost:
                    continue
                marks = marks_of.get(stream)
                if marks is None:
                    # (replays from its first fill and takes marks as it goes)
                    marks = marks_of[stream] = Marks(every=self.mark_every)
                events = journal.setdefault(stream, [])
                try:
                    restated = self._replay(page, stream, events, first_new[stream], floor, marks)
                except UNFOLDABLE:
                    # forget its journal and marks: the replay from the log faults it
                    self._journal_drop(stream)
                    restated = None
                if restated is None:  # reaches before the trimmed journal: whole stream
                    from_log.append(stream)
                    continue
                self._journal_size -= trim_journal(events, marks)
                self._restated(page, stream, events, restated)
        if not from_log:
            return
        by_stream: dict[str, list[StreamRow]] = {s: [] for s in from_log}
        end = page.end
        for stream, position, kind, payload, recorded_at in await conn.fetch(
            sql.STREAMS_FILLS_UPTO, sorted(from_log), str(end.tx_id), end.position
        ):
            by_stream[stream].append(stream_row(position, kind, payload, recorded_at))
        for stream in sorted(from_log):
            events = by_stream[stream]
            marks = None
            if journal is not None and marks_of is not None and stream not in lost:
                # the journal takes the whole stream again, until marks trim it
                self._journal_size += len(events) - len(journal.get(stream, ()))
                journal[stream] = events
                marks = marks_of[stream]
                marks.trimmed = False
            try:
                restated = self._replay(page, stream, events, first_new[stream], floor, marks)
            except UNFOLDABLE as exc:
                self._fault(page, stream, events, exc)
                continue
            if restated is None:  # pragma: no cover - a whole stream always replays
                raise RuntimeError(f"stream {stream} did not replay from its whole log")
            if marks is not None:
                self._journal_size -= trim_journal(events, marks)
            if stream in faulted:
                faulted.discard(stream)
                page.healed.add(stream)
            self._restated(page, stream, events, restated)

    def _fault(
        self, page: Page, stream: str, events: list[StreamRow], error: BaseException
    ) -> None:
        """Set ``stream`` aside: it cannot be folded up to the page's end (``events`` are
        all its rows so far). Its fault is written with the page, its other rows are
        wiped, and it replays from the log whenever a row of its own comes."""
        contract = stream.split("/", 1)[1]
        instrument = self._instruments.get(contract)
        grid = None if instrument is None else (instrument.point_value, instrument.tick_size)
        culprit = culprit_in_rows(stream, events, grid, error) if events else None
        position = culprit.position if culprit else page.restate[stream]
        reason = culprit.reason if culprit else f"{type(error).__name__}: {error}"
        log.warning(
            "stream %s is faulted at log position %s (%s); it is set aside, every other "
            "stream goes on",
            stream,
            position,
            reason,
        )
        page.faults[stream] = (position, culprit.exec_id if culprit else None, reason)
        page.healed.discard(stream)
        for rewritten in (page.effects, page.cum_before, page.seed, page.forget):
            rewritten.pop(stream, None)
        page.snapshots = [s for s in page.snapshots if s[0] != stream]
        self._cache.pop(stream, None)
        self._known.pop(stream, None)
        self._journal_drop(stream)
        if self._faulted is not None:
            self._faulted.add(stream)

    def _replay(
        self,
        page: Page,
        stream: str,
        events: list[StreamRow],
        first_new: int,
        floor: date,
        marks: Marks | None,
    ) -> Restated | None:
        account, contract = stream.split("/", 1)
        instrument = self._instrument(contract)
        folded = page.effects.get(stream)  # what the page folded before the restatement
        return restate_stream(
            new_state(account, contract, instrument.point_value, instrument.tick_size),
            events,
            first_new,
            self._utc_days,
            self._day,
            floor,
            marks,
            (folded[0][E_OCCURRED_AT], folded[0][E_POSITION]) if folded else None,
        )

    def _restated(
        self, page: Page, stream: str, events: list[StreamRow], restated: Restated
    ) -> None:
        """Take a replayed stream's state, and what it rewrites, into ``page``."""
        state = restated.state
        if restated.forget is not None:
            page.forget[stream] = restated.forget
        if restated.seed is not None:
            page.seed[stream] = restated.seed
        self._cache[stream] = state
        self._cache.move_to_end(stream)
        latest = max((e[R_RECORDED_AT] for e in events), default=None)
        known = self._known.get(stream)
        if latest is None or (known is not None and known > latest):
            latest = known  # (a trimmed journal's rows need not hold the latest)
        if latest is not None:
            self._known[stream] = latest
        page.effects[stream] = restated.effects
        page.cum_before[stream] = restated.cum_before
        # The page's earlier snapshots of the stream are superseded by one snapshot of
        # the whole of what is known at this point. (Intermediate replay states would
        # miss fills known here but later in event order, so they could not serve a tail
        # read by log position.)
        page.snapshots = [s for s in page.snapshots if s[0] != stream]
        if state.last_key is not None and latest is not None:
            page.snapshots.append(
                (
                    stream,
                    page.restate[stream],
                    state.last_key[1],
                    state.last_key[0],
                    latest,
                    state.json_text(),
                )
            )

    def _position_columns(self, streams: set[str]) -> PositionColumns:
        """The proj_positions columns of ``streams``, from their cached states."""
        return position_columns(sorted(streams), self._cache)
