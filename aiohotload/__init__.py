"""aiohotload: an asyncio PostgreSQL pool that reloads its connection string live."""

from __future__ import annotations

from .drivers import Driver, register_driver, unregister_driver
from .dsn import check_dsn
from .errors import (
    DriverError,
    HotloadError,
    InvalidDSNError,
    InvalidOptionError,
    InvalidURLError,
    PoolClosedError,
    RegistryError,
    SourceError,
    StrategyError,
    UnknownDriverError,
    UnknownStrategyError,
)
from .events import (
    ConnectionExpired,
    Event,
    EventStream,
    FailoverDetected,
    ForceKillDone,
    PoolDrained,
    RefreshRequested,
    ReloadFailed,
    ReloadStarted,
    SwapDone,
)
from .pool import HotPool, create_pool
from .redact import describe_error, redact_dsn
from .strategies import Feedback, News, Strategy, register_strategy, unregister_strategy
from .url import DEFAULT_CONNECT_TIMEOUT, DEFAULT_DRAIN_TIMEOUT, HotloadURL, parse_url

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_DRAIN_TIMEOUT",
    "ConnectionExpired",
    "Driver",
    "DriverError",
    "Event",
    "EventStream",
    "FailoverDetected",
    "Feedback",
    "ForceKillDone",
    "HotPool",
    "HotloadError",
    "HotloadURL",
    "InvalidDSNError",
    "InvalidOptionError",
    "InvalidURLError",
    "News",
    "PoolClosedError",
    "PoolDrained",
    "RefreshRequested",
    "RegistryError",
    "ReloadFailed",
    "ReloadStarted",
    "SourceError",
    "Strategy",
    "StrategyError",
    "SwapDone",
    "UnknownDriverError",
    "UnknownStrategyError",
    "check_dsn",
    "create_pool",
    "describe_error",
    "parse_url",
    "redact_dsn",
    "register_driver",
    "register_strategy",
    "unregister_driver",
    "unregister_strategy",
]

__version__ = "0.1.0"
