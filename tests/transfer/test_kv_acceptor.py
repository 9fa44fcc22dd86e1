"""The decode worker's KV acceptor on its own: idle without log noise, and not stuck on a pair
request slot that a requester took and never filled."""

from __future__ import annotations

import datetime
import time

import pytest
import torch

from transfer.errors import TransferError
from transfer.kv_layout import layout_of
from transfer.kv_pair import HELLO_COUNTER, connect_store, hello_key
from transfer.kv_receiver import KvReceiver, ReceiverConfig
from transfer.messages import KvHelloReply, TransferHeader, decode_message

HELLO_WAIT_S = 0.3


class _NoTransfers:
    def claim(self, header: TransferHeader) -> None:
        raise AssertionError("no transfer is expected")

    def landed(self, header: TransferHeader) -> None:
        raise AssertionError("no transfer is expected")

    def failed(self, header: TransferHeader, error: TransferError) -> None:
        raise AssertionError("no transfer is expected")


def test_an_idle_acceptor_logs_nothing_and_skips_a_slot_never_filled(
    capfd: pytest.CaptureFixture[str],
) -> None:
    cache = torch.zeros((2, 1, 4, 4, 1, 8))
    receiver = KvReceiver(
        cache,
        layout_of(cache, "m"),
        _NoTransfers(),
        ReceiverConfig(timeout_s=5.0, hello_wait_s=HELLO_WAIT_S),
    )
    receiver.start()
    try:
        # Idle through several of the acceptor's waits: c10d logs a warning for every store
        # wait that times out, which an idle worker used to print once a minute.
        time.sleep(3 * HELLO_WAIT_S)
        store = connect_store("127.0.0.1", receiver.port, 5.0)
        store.add(HELLO_COUNTER, 1)  # slot 0: taken, never filled (its requester died)
        slot = int(store.add(HELLO_COUNTER, 1)) - 1
        assert slot == 1
        store.set(hello_key(slot), b"not a pair request")
        reply_key = hello_key(slot) + "/reply"
        store.wait([reply_key], datetime.timedelta(seconds=5 + HELLO_WAIT_S))
        reply = decode_message(bytes(store.get(reply_key)), KvHelloReply)
        assert not reply.accepted and "malformed pair request" in reply.reason
    finally:
        receiver.stop()
    assert "waitForInput" not in capfd.readouterr().err
