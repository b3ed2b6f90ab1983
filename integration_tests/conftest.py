"""Fixtures shared by the integration tests, on top of aiohotload's pytest plugin."""

from __future__ import annotations

from pathlib import Path

import pytest

from aiohotload.testing import PgServer, Role, RoleFactory


@pytest.fixture
def dsn_path(tmp_path: Path) -> Path:
    """Where a test writes its DSN file (``write_dsn``); the plugin's ``dsn_file`` is a
    :class:`~aiohotload.testing.DsnFile` instead."""
    return tmp_path / "dsn.txt"


@pytest.fixture
async def user_ab(pg_a: PgServer, pg_b: PgServer, role: RoleFactory) -> Role:
    """One role with the same name and (hostile) password on both servers."""
    made = await role(pg_a)
    await role(pg_b, name=made.name, password=made.password)
    return made
