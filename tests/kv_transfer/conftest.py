"""One peer process (tests/kv_transfer/peer.py) per test module that asks for it."""

from __future__ import annotations

import pytest

from tests.kv_transfer.peer import Peer


@pytest.fixture(scope="module")
def peer():
    with Peer() as p:
        yield p
