"""Strategies: where a DSN comes from and how its changes are seen.

A strategy is any object with a ``watch(path, options)`` method returning an async iterator
of DSN strings (usually an async generator). The first value is the initial DSN; each later
value is a change. A strategy validates its options before yielding anything and raises
:class:`~aiohotload.InvalidOptionError` for an option it does not know.

A strategy that declares a keyword-only ``feedback`` parameter, ``watch(path, options, *,
feedback)``, also hears from its pool through a :class:`~aiohotload.strategies.Feedback`:
requests to look again now (a login was refused) and DSNs no longer in use (see
:mod:`aiohotload.strategies.feedback`).

:mod:`aiohotload.strategies.toolkit` holds what the built-in strategies share and others may
use: option checks, jittered backoff, and text safe to put in a message.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Protocol, runtime_checkable

from .._registry import Registry
from ..errors import RegistryError, UnknownStrategyError
from .feedback import Feedback, News, wants_feedback

__all__ = [
    "Feedback",
    "News",
    "Strategy",
    "get_strategy",
    "open_watch",
    "register_strategy",
    "strategy_names",
    "takes_feedback",
    "unregister_strategy",
]


@runtime_checkable
class Strategy(Protocol):
    """Produces DSNs: the first yielded value is the initial DSN, later ones are changes."""

    def watch(self, path: str, options: Mapping[str, str]) -> AsyncIterator[str]:
        """Yield the current DSN, then each new DSN as it changes, until cancelled."""
        ...


class _FunctionStrategy:
    """Adapts a plain ``async def f(path, options)`` generator function to :class:`Strategy`."""

    def __init__(self, func: Callable[[str, Mapping[str, str]], AsyncIterator[str]]) -> None:
        self._func = func

    def watch(self, path: str, options: Mapping[str, str]) -> AsyncIterator[str]:
        return self._func(path, options)

    @property
    def wants_feedback(self) -> bool:
        return wants_feedback(self._func)

    def watch_with(
        self, path: str, options: Mapping[str, str], feedback: Feedback
    ) -> AsyncIterator[str]:
        return self._func(path, options, feedback=feedback)  # type: ignore[call-arg]

    def __repr__(self) -> str:
        return f"<strategy {getattr(self._func, '__qualname__', self._func)!r}>"


def open_watch(
    strategy: Strategy, path: str, options: Mapping[str, str], feedback: Feedback | None
) -> AsyncIterator[str]:
    """Start *strategy*'s watch, passing *feedback* if the strategy takes it."""
    if feedback is not None and takes_feedback(strategy):
        if isinstance(strategy, _FunctionStrategy):
            return strategy.watch_with(path, options, feedback)
        watch = strategy.watch
        return watch(path, options, feedback=feedback)  # type: ignore[call-arg]
    return strategy.watch(path, options)


def takes_feedback(strategy: Strategy) -> bool:
    """Whether *strategy*'s watch declares the optional ``feedback`` parameter."""
    if isinstance(strategy, _FunctionStrategy):
        return strategy.wants_feedback
    return wants_feedback(strategy.watch)


def _coerce(item: object) -> Strategy:
    if isinstance(item, type):
        # A class (as entry points often name): its instance is the strategy.
        item = item()
    if isinstance(item, Strategy):
        return item
    if inspect.isasyncgenfunction(item):
        return _FunctionStrategy(item)
    raise RegistryError(
        f"a strategy must have a watch(path, options) method or be an async generator "
        f"function; got {type(item).__name__}"
    )


_registry: Registry[Strategy] = Registry(
    "strategy", "aiohotload.strategies", UnknownStrategyError, _coerce
)


def register_strategy(name: str, strategy: object, *, replace: bool = False) -> None:
    """Register *strategy* under the URL scheme *name*.

    *strategy* is a :class:`Strategy` or an async generator function ``f(path, options)``.
    Raises :class:`~aiohotload.RegistryError` for an empty or already registered name
    unless ``replace=True``.
    """
    _registry.register(name, strategy, replace=replace)


def unregister_strategy(name: str) -> None:
    """Remove the strategy registered under *name*, if any."""
    _registry.unregister(name)


def get_strategy(name: str) -> Strategy:
    """The strategy registered under *name*; :class:`~aiohotload.UnknownStrategyError` if none."""
    return _registry.get(name)


def strategy_names() -> list[str]:
    """Names of every registered strategy, entry-point plugins included."""
    return _registry.names()


def _register_builtins() -> None:
    from .command import ExecStrategy
    from .env import EnvStrategy
    from .files import WatchfilesStrategy

    files = WatchfilesStrategy()
    register_strategy("watchfiles", files)
    # Go hotload's scheme, so its URLs work unchanged.
    register_strategy("fsnotify", files)
    register_strategy("exec", ExecStrategy())
    register_strategy("env", EnvStrategy())


_register_builtins()
