"""fewer_collections: the collector's settings are the caller's again afterwards."""

from __future__ import annotations

import gc

import pytest

from ledger.store import fewer_collections


def test_fewer_collections_raises_the_thresholds_and_restores_them() -> None:
    before = gc.get_threshold()
    frozen = gc.get_freeze_count()
    with fewer_collections():
        assert gc.get_threshold() == (100_000, 50, 1000)
        assert gc.get_freeze_count() == frozen
    assert gc.get_threshold() == before


def test_fewer_collections_freezes_what_is_there_and_thaws_it_on_exit() -> None:
    assert gc.get_freeze_count() == 0
    keep = [object() for _ in range(10)]
    with fewer_collections(freeze=True):
        assert gc.get_freeze_count() >= len(keep)
    assert gc.get_freeze_count() == 0


def test_a_callers_own_freeze_stands() -> None:
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with fewer_collections(freeze=True):
            pass
        assert gc.get_freeze_count() >= frozen > 0
    finally:
        gc.unfreeze()


def test_the_collector_is_restored_when_the_body_raises() -> None:
    before = gc.get_threshold()
    with pytest.raises(RuntimeError), fewer_collections(freeze=True):
        raise RuntimeError("body")
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_settle_moves_what_is_alive_out_of_sight_and_exit_gives_it_back() -> None:
    assert gc.get_freeze_count() == 0
    with fewer_collections(freeze=True) as settle:
        at_entry = gc.get_freeze_count()
        page = [[i] for i in range(1_000)]  # tracked by the collector: lists
        settle()
        assert gc.get_freeze_count() >= at_entry + len(page)
        assert gc.get_count()[0] == 0  # the young generation starts empty again
    assert gc.get_freeze_count() == 0


def test_settle_does_nothing_without_the_frozen_generation_to_itself() -> None:
    with fewer_collections() as settle:
        settle()
        assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        with fewer_collections(freeze=True) as settle:
            frozen = gc.get_freeze_count()
            page = [[i] for i in range(1_000)]
            settle()
            assert gc.get_freeze_count() == frozen
            del page
    finally:
        gc.unfreeze()
