"""The consumer reads a message's stream sequence from its ack subject as nats-py does."""

from __future__ import annotations

import pytest
from nats.aio.msg import Msg

from ledger.consume import _stream_sequence

_T = "1733238000000000000"


@pytest.mark.parametrize(
    "reply",
    [
        f"$JS.ACK.LEDGER_IN.ledger.1.42.7.{_T}.3",  # the common form: split by the consumer
        f"$JS.ACK.LEDGER_IN.ledger.12.9007199254740993.7.{_T}.0",
        f"$JS.ACK.hub.ACCOUNTHASH.LEDGER_IN.ledger.1.42.7.{_T}.3.r4nd",  # with a domain
        f"$JS.ACK._.ACCOUNTHASH.LEDGER_IN.ledger.2.43.8.{_T}.1.r4nd",
    ],
)
def test_the_sequence_is_the_one_nats_reads(reply: str) -> None:
    expected = Msg(_client=None, subject="s", reply=reply).metadata.sequence.stream  # type: ignore[arg-type]
    assert _stream_sequence(Msg(_client=None, subject="s", reply=reply)) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "reply", ["", "_INBOX.abc.1", "$JS.ACK.S.C.1.x.7.1.3", "$JS.ACK.too.short"]
)
def test_a_message_without_a_readable_sequence_has_none(reply: str) -> None:
    assert _stream_sequence(Msg(_client=None, subject="s", reply=reply)) is None  # type: ignore[arg-type]
