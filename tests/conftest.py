"""Fixtures the unit tests share (helpers are in ``support.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import aiohotload
from tests.support import FakeDriver, QueueStrategy


@pytest.fixture
def driver() -> Iterator[FakeDriver]:
    """A :class:`FakeDriver` registered as the driver ``fake``."""
    fake = FakeDriver()
    aiohotload.register_driver("fake", fake)
    yield fake
    aiohotload.unregister_driver("fake")


@pytest.fixture
def strategy() -> Iterator[QueueStrategy]:
    """A :class:`QueueStrategy` registered as the strategy ``queue``."""
    queue = QueueStrategy()
    aiohotload.register_strategy("queue", queue)
    yield queue
    aiohotload.unregister_strategy("queue")
