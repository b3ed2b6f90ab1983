"""The env strategy: a DSN read once from an environment variable."""

from __future__ import annotations

import logging

import pytest

from aiohotload.errors import InvalidOptionError, InvalidURLError, SourceError
from aiohotload.strategies import Strategy, get_strategy
from aiohotload.strategies.env import EnvStrategy
from aiohotload.url import parse_url

VAR = "AIOHOTLOAD_TEST_ENV_DSN"
DSN = "postgresql://app:s3cr%40t@db:5432/app"


async def values(path: str, options: dict[str, str] | None = None) -> list[str]:
    return [dsn async for dsn in EnvStrategy().watch(path, options or {})]


def test_registered_as_builtin() -> None:
    assert isinstance(get_strategy("env"), EnvStrategy)
    assert isinstance(EnvStrategy(), Strategy)


async def test_yields_the_value_once_then_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VAR, f"  {DSN}\n")
    url = parse_url(f"env://postgres/{VAR}")
    assert [d async for d in get_strategy(url.strategy).watch(url.path, url.options)] == [DSN]


async def test_key_value_dsn_is_passed_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VAR, "host=db user=app password='p w'")
    assert await values(f"/{VAR}") == ["host=db user=app password='p w'"]


async def test_logs_the_dsn_redacted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiohotload.strategies.env")
    monkeypatch.setenv(VAR, DSN)
    await values(f"/{VAR}")
    (record,) = [r for r in caplog.records if r.name == "aiohotload.strategies.env"]
    assert record.levelno == logging.INFO
    assert VAR in record.getMessage()
    assert "app@db" not in record.getMessage()  # the password sits between
    assert "s3cr" not in caplog.text


async def test_unset_variable_is_a_source_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(VAR, raising=False)
    with pytest.raises(SourceError, match=f"{VAR}.*not set"):
        await values(f"/{VAR}")


@pytest.mark.parametrize("value", ["", "  \n\t"])
async def test_empty_variable_is_a_source_error(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(VAR, value)
    with pytest.raises(SourceError, match=f"{VAR}.*empty"):
        await values(f"/{VAR}")


@pytest.mark.parametrize("options", [{"interval": "1s"}, {"x": "1", "a": "2"}])
async def test_any_option_is_rejected(
    monkeypatch: pytest.MonkeyPatch, options: dict[str, str]
) -> None:
    monkeypatch.setenv(VAR, DSN)
    with pytest.raises(InvalidOptionError, match="takes no options") as info:
        await values(f"/{VAR}", options)
    assert all(repr(name) in str(info.value) for name in options)


@pytest.mark.parametrize("path", ["/", "", "/A/B", "/A=B", "/A\x00B"])
async def test_bad_variable_names_are_rejected(path: str) -> None:
    with pytest.raises(InvalidURLError, match="env://postgres/NAME"):
        await values(path)
