"""Strategy and driver registries: names, lookups, errors and entry-point plugins."""

from __future__ import annotations

import itertools
import logging
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

import aiohotload
from aiohotload import (
    HotloadError,
    RegistryError,
    Strategy,
    UnknownDriverError,
    UnknownStrategyError,
    register_driver,
    register_strategy,
    unregister_driver,
    unregister_strategy,
)
from aiohotload import drivers as drivers_module
from aiohotload import strategies as strategies_module
from aiohotload.drivers import driver_names, get_driver
from aiohotload.strategies import get_strategy, strategy_names


class StaticStrategy:
    """Yields one fixed DSN."""

    def __init__(self, dsn: str = "postgresql://u@h/db") -> None:
        self.dsn = dsn

    async def watch(self, path: str, options: Mapping[str, str]) -> AsyncIterator[str]:
        yield self.dsn


async def fake_driver(dsn: str, **pool_kwargs: Any) -> Any:
    return (dsn, pool_kwargs)


@pytest.fixture
def strategy_names_to_drop() -> Iterator[list[str]]:
    """Names the test registers as strategies; unregistered afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        unregister_strategy(name)


@pytest.fixture
def driver_names_to_drop() -> Iterator[list[str]]:
    """Names the test registers as drivers; unregistered afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        unregister_driver(name)


@pytest.fixture
def add_strategy(strategy_names_to_drop: list[str]) -> Callable[..., None]:
    def add(name: str, strategy: object, *, replace: bool = False) -> None:
        strategy_names_to_drop.append(name)
        register_strategy(name, strategy, replace=replace)

    return add


@pytest.fixture
def add_driver(driver_names_to_drop: list[str]) -> Callable[..., None]:
    def add(name: str, factory: object, *, replace: bool = False) -> None:
        driver_names_to_drop.append(name)
        register_driver(name, factory, replace=replace)

    return add


# -- names --------------------------------------------------------------------------------

_BAD_NAMES: list[object] = [
    "",
    " ",
    "\t\n",
    " padded",
    "padded ",
    "two words",
    "tab\there",
    "new\nline",
    "nbsp\u00a0x",
    "a:b",
    "a/b",
    "a?b",
    "a#b",
    "a&b",
    "a=b",
    "a@b",
    "a%20b",
    None,
    42,
    b"bytes",
    ["list"],
]


@pytest.mark.parametrize("name", _BAD_NAMES)
def test_register_strategy_rejects_bad_names(name: object) -> None:
    with pytest.raises(RegistryError, match="strategy name"):
        register_strategy(name, StaticStrategy())  # type: ignore[arg-type]


@pytest.mark.parametrize("name", _BAD_NAMES)
def test_register_driver_rejects_bad_names(name: object) -> None:
    with pytest.raises(RegistryError, match="driver name"):
        register_driver(name, fake_driver)  # type: ignore[arg-type]


def test_registry_error_is_a_value_error() -> None:
    assert issubclass(RegistryError, ValueError)
    assert issubclass(RegistryError, HotloadError)
    assert issubclass(UnknownStrategyError, LookupError)
    assert issubclass(UnknownDriverError, LookupError)


def test_duplicate_strategy_is_rejected(add_strategy: Callable[..., None]) -> None:
    first = StaticStrategy("first")
    add_strategy("dupstrat", first)
    with pytest.raises(RegistryError, match="strategy 'dupstrat' is already registered"):
        register_strategy("dupstrat", StaticStrategy("second"))
    # Names are case-insensitive, so another spelling is the same name.
    with pytest.raises(RegistryError, match="'dupstrat' is already registered"):
        register_strategy("DupStrat", StaticStrategy("second"))
    assert get_strategy("dupstrat") is first


def test_builtin_strategy_cannot_be_replaced_by_accident() -> None:
    with pytest.raises(RegistryError, match="'watchfiles' is already registered"):
        register_strategy("watchfiles", StaticStrategy())
    with pytest.raises(RegistryError, match="'postgres' is already registered"):
        register_driver("Postgres", fake_driver)


def test_duplicate_driver_is_rejected(add_driver: Callable[..., None]) -> None:
    add_driver("dupdriver", fake_driver)
    with pytest.raises(RegistryError, match="driver 'dupdriver' is already registered"):
        register_driver("DUPDRIVER", fake_driver)


def test_replace_true_replaces(
    add_strategy: Callable[..., None], add_driver: Callable[..., None]
) -> None:
    first, second = StaticStrategy("first"), StaticStrategy("second")
    add_strategy("replstrat", first)
    add_strategy("ReplStrat", second, replace=True)
    assert get_strategy("replstrat") is second

    async def other_driver(dsn: str, **pool_kwargs: Any) -> Any:
        return None

    add_driver("repldriver", fake_driver)
    add_driver("repldriver", other_driver, replace=True)
    assert get_driver("repldriver") is other_driver


def test_replace_true_registers_a_new_name(add_strategy: Callable[..., None]) -> None:
    strategy = StaticStrategy()
    add_strategy("freshstrat", strategy, replace=True)
    assert get_strategy("freshstrat") is strategy


def test_lookups_are_case_insensitive(
    add_strategy: Callable[..., None], add_driver: Callable[..., None]
) -> None:
    strategy = StaticStrategy()
    add_strategy("CamelStrat", strategy)
    add_driver("CamelDriver", fake_driver)
    for name in ("CamelStrat", "camelstrat", "CAMELSTRAT"):
        assert get_strategy(name) is strategy
    for name in ("CamelDriver", "cameldriver", "CAMELDRIVER"):
        assert get_driver(name) is fake_driver
    assert "camelstrat" in strategy_names()
    assert "cameldriver" in driver_names()
    assert get_strategy("FsNotify") is get_strategy("watchfiles")


def test_unregister(add_strategy: Callable[..., None], add_driver: Callable[..., None]) -> None:
    add_strategy("gonestrat", StaticStrategy())
    add_driver("gonedriver", fake_driver)
    unregister_strategy("GoneStrat")
    unregister_driver("GONEDRIVER")
    with pytest.raises(UnknownStrategyError):
        get_strategy("gonestrat")
    with pytest.raises(UnknownDriverError):
        get_driver("gonedriver")
    # Unregistering what is not there is not an error.
    unregister_strategy("gonestrat")
    unregister_driver("never-registered")
    unregister_strategy(None)  # type: ignore[arg-type]


def test_unknown_strategy_lists_registered_names() -> None:
    with pytest.raises(UnknownStrategyError) as info:
        get_strategy("nosuch")
    message = str(info.value)
    assert message.startswith("unknown strategy 'nosuch'; registered: ")
    assert "fsnotify" in message
    assert "watchfiles" in message


def test_unknown_driver_lists_registered_names() -> None:
    with pytest.raises(UnknownDriverError) as info:
        get_driver("NoSuch")
    message = str(info.value)
    assert message.startswith("unknown driver 'NoSuch'; registered: ")
    assert "postgres" in message
    assert "postgresql" in message


def test_lookup_of_a_non_str_is_an_unknown_name() -> None:
    with pytest.raises(UnknownStrategyError, match="unknown strategy None"):
        get_strategy(None)  # type: ignore[arg-type]


# -- what a strategy or driver may be -----------------------------------------------------


def test_strategy_object_is_kept_as_is(add_strategy: Callable[..., None]) -> None:
    strategy = StaticStrategy()
    add_strategy("objstrat", strategy)
    assert get_strategy("objstrat") is strategy


async def test_async_generator_function_is_a_strategy(add_strategy: Callable[..., None]) -> None:
    seen: list[tuple[str, dict[str, str]]] = []

    async def from_env(path: str, options: Mapping[str, str]) -> AsyncIterator[str]:
        seen.append((path, dict(options)))
        yield "postgresql://u@first/db"
        yield "postgresql://u@second/db"

    add_strategy("genstrat", from_env)
    strategy = get_strategy("genstrat")
    assert isinstance(strategy, Strategy)
    assert "from_env" in repr(strategy)
    dsns = [dsn async for dsn in strategy.watch("/x", {"a": "1"})]
    assert dsns == ["postgresql://u@first/db", "postgresql://u@second/db"]
    assert seen == [("/x", {"a": "1"})]


@pytest.mark.parametrize("item", [None, 42, "watchfiles", object(), {"watch": None}])
def test_non_strategy_is_rejected(item: object) -> None:
    with pytest.raises(RegistryError, match=f"a strategy must have a watch.*{type(item).__name__}"):
        register_strategy("notastrat", item)
    with pytest.raises(UnknownStrategyError):
        get_strategy("notastrat")


def test_strategy_class_is_instantiated(add_strategy: Callable[..., None]) -> None:
    add_strategy("classstrat", StaticStrategy)
    assert isinstance(get_strategy("classstrat"), StaticStrategy)


def test_plain_coroutine_function_is_not_a_strategy() -> None:
    async def not_a_generator(path: str, options: object) -> str:
        return "postgresql://h/db"

    with pytest.raises(RegistryError, match="watch"):
        register_strategy("coro", not_a_generator)


@pytest.mark.parametrize("item", [None, 42, "postgres", object()])
def test_non_callable_driver_is_rejected(item: object) -> None:
    with pytest.raises(
        RegistryError, match=f"a driver must be an async callable.*got {type(item).__name__}$"
    ):
        register_driver("notadriver", item)


def test_url_names_reach_the_registry(
    add_strategy: Callable[..., None], add_driver: Callable[..., None]
) -> None:
    # Every character a URL scheme or host allows is accepted as a name.
    add_strategy("my-plug+v2.x", StaticStrategy())
    add_driver("my_driver-2.x", fake_driver)
    url = aiohotload.parse_url("My-Plug+V2.x://My_Driver-2.x/etc/dsn")
    assert isinstance(get_strategy(url.strategy), StaticStrategy)
    assert get_driver(url.driver) is fake_driver


# -- HotPool resolves names when it is created --------------------------------------------


def test_hotpool_with_unknown_strategy_raises_at_once() -> None:
    with pytest.raises(UnknownStrategyError, match=r"unknown strategy 'nosuch'.*watchfiles"):
        aiohotload.HotPool("nosuch://postgres/x")


def test_create_pool_with_unknown_driver_raises_at_once() -> None:
    with pytest.raises(UnknownDriverError, match=r"unknown driver 'nosuch'.*postgres"):
        aiohotload.create_pool("watchfiles://nosuch/x")


def test_create_pool_with_bad_url_raises_at_once() -> None:
    with pytest.raises(aiohotload.InvalidURLError):
        aiohotload.create_pool("watchfiles:/postgres/x")


def test_create_pool_uses_registered_names(
    add_strategy: Callable[..., None], add_driver: Callable[..., None]
) -> None:
    add_strategy("poolstrat", StaticStrategy())
    add_driver("pooldriver", fake_driver)
    pool = aiohotload.create_pool("PoolStrat://PoolDriver/x")
    assert isinstance(pool, aiohotload.HotPool)


# -- entry points -------------------------------------------------------------------------

_counter = itertools.count()


@pytest.fixture
def reset_entry_points() -> Iterator[None]:
    """Make both registries read entry points again, before and after the test."""
    registries = (strategies_module._registry, drivers_module._registry)
    for registry in registries:
        registry._reset_entry_points()
    yield
    for registry in registries:
        registry._reset_entry_points()


@pytest.fixture
def plugin_dist(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    reset_entry_points: None,
    strategy_names_to_drop: list[str],
    driver_names_to_drop: list[str],
) -> str:
    """Install a throwaway distribution declaring aiohotload plugins; return its module name.

    It declares strategies ``myplug`` (a class), ``myfunc`` (an async generator function),
    ``broken`` (a missing module), ``badattr`` (a missing attribute) and ``watchfiles`` (a
    clash with the built-in), and the driver ``mydriver``.
    """
    module = f"aiohotload_test_plugin_{next(_counter)}"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            """
            INSTANCES = []

            class MyStrategy:
                def __init__(self):
                    INSTANCES.append(self)

                async def watch(self, path, options):
                    yield "postgresql://plugin@host/" + path

            async def func_strategy(path, options):
                yield "postgresql://func@host/db"

            async def my_driver(dsn, **pool_kwargs):
                return dsn
            """
        )
    )
    info = tmp_path / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        textwrap.dedent(
            f"""
            [aiohotload.strategies]
            broken = {module}_missing:Nope
            myplug = {module}:MyStrategy
            badattr = {module}:does_not_exist
            myfunc = {module}:func_strategy
            watchfiles = {module}:func_strategy

            [aiohotload.drivers]
            mydriver = {module}:my_driver
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    strategy_names_to_drop.extend(["myplug", "myfunc", "broken", "badattr"])
    driver_names_to_drop.append("mydriver")
    return module


async def test_entry_point_strategy_class_is_instantiated(plugin_dist: str) -> None:
    strategy = get_strategy("MyPlug")
    plugin = sys.modules[plugin_dist]
    assert isinstance(strategy, plugin.MyStrategy)
    assert [strategy] == plugin.INSTANCES
    # Found once, then kept: the same instance on every lookup.
    assert get_strategy("myplug") is strategy
    dsns = [dsn async for dsn in strategy.watch("db", {})]
    assert dsns == ["postgresql://plugin@host/db"]


async def test_entry_point_function_strategy(plugin_dist: str) -> None:
    strategy = get_strategy("myfunc")
    assert [dsn async for dsn in strategy.watch("/x", {})] == ["postgresql://func@host/db"]


def test_entry_point_driver(plugin_dist: str) -> None:
    driver = get_driver("mydriver")
    assert driver is sys.modules[plugin_dist].my_driver
    assert "mydriver" in driver_names()


def test_entry_points_appear_in_names(plugin_dist: str) -> None:
    names = strategy_names()
    assert {"myplug", "myfunc", "watchfiles", "fsnotify"} <= set(names)
    assert "broken" not in names
    assert names == sorted(names)


def test_entry_point_does_not_override_a_builtin(plugin_dist: str) -> None:
    builtin = get_strategy("fsnotify")
    strategy_names()
    assert get_strategy("watchfiles") is builtin


def test_broken_entry_point_logs_and_spares_other_lookups(
    plugin_dist: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="aiohotload"):
        assert isinstance(get_strategy("myplug"), sys.modules[plugin_dist].MyStrategy)
        # The error names why the plugin did not load (what to install), not just "unknown".
        with pytest.raises(UnknownStrategyError, match="strategy 'broken' could not be loaded"):
            get_strategy("broken")
        with pytest.raises(UnknownStrategyError, match="unknown strategy 'nosuch'") as info:
            get_strategy("nosuch")
        assert "myplug" in str(info.value)
        assert get_strategy("watchfiles") is get_strategy("fsnotify")
        with pytest.raises(UnknownStrategyError):
            get_strategy("badattr")

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    messages = [r.getMessage() for r in warnings]
    assert any("'broken'" in m and f"{plugin_dist}_missing:Nope" in m for m in messages)
    assert any("'badattr'" in m and "does_not_exist" in m for m in messages)
    # Entry points are read once, so each broken plugin is reported once.
    assert len(messages) == 2, messages


def test_entry_points_are_read_once_until_reset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reset_entry_points: None
) -> None:
    with pytest.raises(UnknownStrategyError):
        get_strategy("lateplug")
    # A plugin installed after the first miss is not seen ...
    module = f"aiohotload_test_late_{next(_counter)}"
    (tmp_path / f"{module}.py").write_text(
        "async def late(path, options):\n    yield 'postgresql://late@h/db'\n"
    )
    info = tmp_path / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[aiohotload.strategies]\nlateplug = {module}:late\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(UnknownStrategyError):
            get_strategy("lateplug")
        # ... until the registry is told to look again.
        strategies_module._registry._reset_entry_points()
        assert isinstance(get_strategy("lateplug"), Strategy)
    finally:
        unregister_strategy("lateplug")
        monkeypatch.delitem(sys.modules, module, raising=False)
