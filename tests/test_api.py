"""HotPool is a drop-in for asyncpg.Pool: the same public methods with the same parameters."""

from __future__ import annotations

import inspect

import asyncpg
import pytest

import aiohotload

POOL_METHODS = [
    "acquire", "release", "fetch", "fetchrow", "fetchval", "fetchmany", "execute",
    "executemany", "copy_from_query", "copy_from_table", "copy_to_table",
    "copy_records_to_table", "close", "terminate", "expire_connections", "get_size",
    "get_min_size", "get_max_size", "get_idle_size", "is_closing", "get_init_size",
    "set_connect_args",
]  # fmt: skip


def shape(func: object) -> list[tuple[str, object, object]]:
    params = list(inspect.signature(func).parameters.values())[1:]  # type: ignore[arg-type]
    return [(p.name, p.kind, p.default) for p in params]


@pytest.mark.parametrize("name", POOL_METHODS)
def test_same_parameters_as_asyncpg(name: str) -> None:
    ours = getattr(aiohotload.HotPool, name)
    theirs = getattr(asyncpg.Pool, name, None)
    if theirs is None:  # get_init_size is asyncpg 0.32's; HotPool has it with any asyncpg
        pytest.skip(f"asyncpg {asyncpg.__version__} has no Pool.{name}")
    assert shape(ours) == shape(theirs)
    assert inspect.iscoroutinefunction(ours) == inspect.iscoroutinefunction(theirs)
    assert ours.__doc__


def test_public_api_is_exported() -> None:
    # Its order is ruff's (RUF022: constants first, then the rest, each sorted).
    assert len(set(aiohotload.__all__)) == len(aiohotload.__all__)
    for name in aiohotload.__all__:
        assert getattr(aiohotload, name) is not None
