"""A HotPool where code annotated for asyncpg expects an ``asyncpg.Pool``: it is one, and
mypy agrees (``nox -s typing`` checks this file)."""

from __future__ import annotations

import asyncio

import asyncpg

import aiohotload


async def count_users(pool: asyncpg.Pool) -> int:  # written for asyncpg
    count = await pool.fetchval("SELECT count(*) FROM users")
    assert isinstance(count, int)
    return count


async def main() -> None:
    async with aiohotload.create_pool("watchfiles://postgres/etc/app/dsn.txt") as pool:
        print(await count_users(pool))  # a HotPool is an asyncpg.Pool


if __name__ == "__main__":
    asyncio.run(main())
