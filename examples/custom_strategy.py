"""A strategy of your own in a few lines: the DSN from an environment variable, polled.

    DATABASE_URL=postgresql://app:secret@127.0.0.1:5432/app python examples/custom_strategy.py

A strategy is an async generator ``f(path, options)``: the first value it yields is the
initial DSN, each later one a change. It may yield the same DSN again (the pool ignores
repeats), so polling is fine. If ``DATABASE_URL_NEXT`` is set too, the script moves
``DATABASE_URL`` to it, as a rotation hook inside the process would, and shows the swap.

To ship a strategy in a package instead of registering it in code, name it in the package's
``pyproject.toml``; ``envpoll://...`` URLs then work wherever the package is installed::

    [project.entry-points."aiohotload.strategies"]
    envpoll = "mypackage.strategies:env_poll"
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping

import aiohotload


async def env_poll(path: str, options: Mapping[str, str]) -> AsyncIterator[str]:
    """Yield the environment variable named by *path* every ``interval`` seconds."""
    # Check the options before yielding anything: a bad URL fails create_pool at once.
    unknown = set(options) - {"interval"}
    if unknown:
        raise aiohotload.InvalidOptionError(
            f"envpoll: unknown option(s) {', '.join(sorted(unknown))}; known: interval"
        )
    try:
        interval = float(options.get("interval", "5"))
    except ValueError:
        raise aiohotload.InvalidOptionError("envpoll: 'interval' must be seconds") from None
    name = path.lstrip("/")
    while True:
        value = os.environ.get(name)
        if not value:
            raise aiohotload.SourceError(f"envpoll: environment variable {name} is not set")
        yield value
        await asyncio.sleep(interval)


aiohotload.register_strategy("envpoll", env_poll)


async def main() -> None:
    url = "envpoll://postgres/DATABASE_URL?interval=0.2"
    async with aiohotload.create_pool(url, min_size=1, max_size=2) as pool:
        await show(pool)
        if next_dsn := os.environ.get("DATABASE_URL_NEXT"):
            os.environ["DATABASE_URL"] = next_dsn
            await pool.wait_for_swap(timeout=10)
            await show(pool)


async def show(pool: aiohotload.HotPool) -> None:
    row = await pool.fetchrow("SELECT current_user AS user, inet_server_port() AS port")
    assert row is not None  # the query always returns one row
    # pool.target is the DSN with its password redacted: safe to print and log.
    print(f"generation {pool.generation}: {row['user']} on port {row['port']} ({pool.target})")


if __name__ == "__main__":
    asyncio.run(main())
