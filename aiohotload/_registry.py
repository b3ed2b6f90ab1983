"""A name -> plugin registry shared by strategies and drivers, with entry-point discovery."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

from .errors import RegistryError

T = TypeVar("T")

logger = logging.getLogger("aiohotload")


class Registry(Generic[T]):
    """Plugins by lower-case name; entry points of *group* are loaded on the first miss."""

    def __init__(
        self,
        kind: str,
        group: str,
        unknown: Callable[[str], Exception],
        coerce: Callable[[object], T],
    ) -> None:
        self._kind = kind
        self._group = group
        self._unknown = unknown
        self._coerce = coerce
        self._items: dict[str, T] = {}
        self._entry_points_loaded = False
        # Why a plugin could not load, by name: the unknown-name error says what to install.
        self._failed: dict[str, str] = {}
        self._lock = threading.Lock()
        # Reentrant: a plugin's import may itself look a name up.
        self._load_lock = threading.RLock()

    def register(self, name: str, item: object, *, replace: bool = False) -> None:
        key = self._check_name(name)
        value = self._coerce(item)
        with self._lock:
            if key in self._items and not replace:
                raise RegistryError(f"{self._kind} {key!r} is already registered")
            self._items[key] = value

    def unregister(self, name: str) -> None:
        if not isinstance(name, str):
            return
        with self._lock:
            self._items.pop(name.lower(), None)

    def get(self, name: str) -> T:
        key = name.lower() if isinstance(name, str) else ""
        item = self._items.get(key)
        if item is None:
            self._load_entry_points()
            item = self._items.get(key)
        if item is None:
            failure = self._failed.get(key)
            if failure is not None:
                raise self._unknown(f"{self._kind} {name!r} could not be loaded: {failure}")
            names = ", ".join(sorted(self._items)) or "none"
            raise self._unknown(f"unknown {self._kind} {name!r}; registered: {names}")
        return item

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._items)

    def _check_name(self, name: str) -> str:
        if not isinstance(name, str) or not name.strip():
            raise RegistryError(f"{self._kind} name must be a non-empty string, got {name!r}")
        # A name is a URL's scheme or host: characters that end or escape those are out.
        if any(c.isspace() or c in ":/?#&=@%" for c in name):
            raise RegistryError(f"{self._kind} name {name!r} has characters a URL cannot carry")
        return name.lower()

    def _load_entry_points(self) -> None:
        # Held throughout, so a second thread waits for the plugins instead of missing them.
        with self._load_lock:
            if self._entry_points_loaded:
                return
            self._entry_points_loaded = True
            for ep in entry_points(group=self._group):
                self._load_entry_point(ep)

    def _load_entry_point(self, ep: EntryPoint) -> None:
        key = ep.name.lower()
        if key in self._items:
            return
        try:
            loaded = ep.load()
            if isinstance(loaded, type):
                loaded = loaded()
            self.register(key, loaded)
        except Exception as exc:  # a broken plugin must not break unrelated URLs
            self._failed[key] = str(exc) or type(exc).__name__
            logger.warning(
                "could not load %s plugin %r from entry point %s: %s",
                self._kind,
                ep.name,
                ep.value,
                exc,
            )

    def _reset_entry_points(self) -> None:
        """Look at entry points again on the next miss (for tests that install plugins)."""
        self._entry_points_loaded = False
        self._failed.clear()
