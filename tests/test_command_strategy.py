"""The exec strategy against real programs: shell scripts written to a temporary directory."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import anyio
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from aiohotload.errors import InvalidOptionError, InvalidURLError, SourceError
from aiohotload.redact import REDACTED
from aiohotload.strategies import Feedback, Strategy, command, get_strategy
from aiohotload.strategies.command import ExecStrategy
from tests.leaks import assert_no_piece_of, leaked

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="uses /bin/sh scripts and /proc"
)

LOGGER = "aiohotload.strategies.command"
OLD = "postgresql://app:old-pw-1@db:5432/app"
NEW = "postgresql://app:new-pw-2@db:5432/app"
# Fast runs, so a test sees several of them in a fraction of a second.
FAST = {"interval": "20ms", "timeout": "5s"}


def script(directory: Path, body: str, name: str = "dsn.sh") -> Path:
    """An executable /bin/sh script; $DIR in *body* is *directory*."""
    path = directory / name
    path.write_text(f'#!/bin/sh\nDIR="{directory}"\n{body}\n')
    path.chmod(0o755)
    return path


def watch(program: Path | str, **options: str) -> AsyncGenerator[str, None]:
    return ExecStrategy().watch(str(program), options)


async def first(program: Path | str, **options: str) -> str:
    gen = watch(program, **options)
    try:
        with anyio.fail_after(10):
            return await anext(gen)
    finally:
        await gen.aclose()


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait until *condition* holds, failing after *timeout* seconds."""
    try:
        with anyio.fail_after(timeout):
            while True:
                if condition():
                    return
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"not within {timeout}s: {what}")


def block_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Like :func:`until`, but holding the event loop: nothing else runs meanwhile."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        time.sleep(0.001)


def runs(directory: Path) -> int:
    path = directory / "runs"
    return len(path.read_text().splitlines()) if path.exists() else 0


def reaped(pid: int) -> bool:
    """True once *pid* is gone from the process table (exited and reaped: no zombie)."""
    return not Path(f"/proc/{pid}").exists()


def _stat(pid: str) -> tuple[str, int] | None:
    """(state, parent pid) of process *pid*, or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return fields[0], int(fields[1])


def our_zombies() -> list[int]:
    """Children of this process that exited and were never waited for."""
    me = os.getpid()
    return [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _stat(pid) == ("Z", me)]


def alive_under(directory: Path) -> list[int]:
    """Running (not zombie) processes whose command line names a file in *directory*."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue
        stat = _stat(pid)
        if str(directory).encode() in cmdline and stat is not None and stat[0] != "Z":
            found.append(int(pid))
    return found


def hanging_script(directory: Path, *, first: str = "") -> Path:
    """A script that prints *first* on its first run if given; otherwise (and later) it
    starts a background helper (whose command line names *directory*) and waits for it."""
    script(directory, "sleep 30", "helper.sh")
    hang = 'echo $$ > "$DIR/pid"; "$DIR/helper.sh" & echo waiting >&2; wait'
    if not first:
        return script(directory, hang)
    return script(
        directory,
        f'if [ -e "$DIR/started" ]; then {hang}; fi\ntouch "$DIR/started"\necho \'{first}\'',
    )


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING
    ]


@pytest.fixture
def dsn_file(tmp_path: Path) -> Path:
    path = tmp_path / "dsn"
    path.write_text(OLD + "\n")
    return path


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    return caplog


def test_registered_as_builtin() -> None:
    assert isinstance(get_strategy("exec"), ExecStrategy)
    assert isinstance(ExecStrategy(), Strategy)


# ---------------------------------------------------------------------------- values


async def test_first_value_is_the_stripped_output(tmp_path: Path) -> None:
    program = script(tmp_path, f"echo '  {OLD}'; echo")
    assert await first(program) == OLD


async def test_args_are_split_like_a_shell_but_no_shell_runs(tmp_path: Path) -> None:
    program = script(tmp_path, 'printf "%s|" "$#" "$@"')
    value = await first(program, args="one 'two three' $HOME \"a;b\" x\\ y")
    assert value == "5|one|two three|$HOME|a;b|x y|"


async def test_a_changed_output_is_yielded_and_repeats_are_not(
    tmp_path: Path, dsn_file: Path, log: pytest.LogCaptureFixture
) -> None:
    program = script(tmp_path, 'echo run >> "$DIR/runs"; cat "$DIR/dsn"')
    gen = watch(program, **FAST)
    try:
        assert await anext(gen) == OLD
        following = asyncio.ensure_future(anext(gen))
        # Several runs print the same DSN; none of them is yielded.
        await until(lambda: runs(tmp_path) >= 4, "four runs")
        assert not following.done()
        dsn_file.write_text(NEW)
        with anyio.fail_after(10):
            assert await following == NEW
    finally:
        await gen.aclose()
    infos = [r.getMessage() for r in log.records if r.levelno == logging.INFO]
    assert any("new DSN" in m and "app:********@db" in m for m in infos)
    assert "old-pw" not in log.text
    assert "new-pw" not in log.text


async def test_json_output_of_the_aws_shape_becomes_a_dsn(tmp_path: Path) -> None:
    password = "p@ss:/?#%&= wörd'\""
    secret = {
        "engine": "postgres",
        "host": "db.example.com",
        "port": 6432,
        "username": "app user",
        "password": password,
        "dbname": "my db",
    }
    (tmp_path / "secret.json").write_text(json.dumps(secret))
    program = script(tmp_path, 'cat "$DIR/secret.json"')
    dsn = await first(program)
    parts = urlsplit(dsn)
    assert parts.scheme == "postgresql"
    assert (parts.hostname, parts.port) == ("db.example.com", 6432)
    assert unquote(parts.username or "") == "app user"
    assert unquote(parts.password or "") == password
    assert unquote(parts.path) == "/my db"


# ---------------------------------------------------------------------------- failures


FAILURES = {
    # name: (what the failing run does, what the warning says)
    "non-zero exit": ("exit 3", "exited with status 3"),
    "timeout": ("sleep 30", "did not finish within 0.5s (timeout) and was killed"),
    "empty output": ("exit 0", "printed no DSN"),
    "signal": ("kill -KILL $$", "was killed by signal SIGKILL"),
    "bad JSON": ("echo '{\"host\": 1'; exit 0", "printed output that starts with '{'"),
}


@pytest.mark.parametrize("failure", FAILURES)
async def test_a_failed_run_keeps_the_value_and_warns_with_scrubbed_stderr_if_asked(
    tmp_path: Path, dsn_file: Path, log: pytest.LogCaptureFixture, failure: str
) -> None:
    action, expected = FAILURES[failure]
    # The current DSN, echoed by the program: its password is scrubbed even in a bare word.
    (tmp_path / "old").write_text(OLD.replace("postgresql://app:", "user app, password "))
    program = script(
        tmp_path,
        f"""echo run >> "$DIR/runs"
if [ -e "$DIR/fail" ]; then
    echo "connecting to postgresql://app:hunter2@db/app failed" >&2
    echo "the server said: password=hunter2 is wrong; $(cat "$DIR/old")" >&2
    {action}
fi
cat "$DIR/dsn"
""",
    )
    gen = watch(program, interval="20ms", timeout="500ms", show_stderr="true")
    try:
        assert await anext(gen) == OLD
        (tmp_path / "fail").touch()
        following = asyncio.ensure_future(anext(gen))
        await until(lambda: bool(warnings(log)), "a warning")
        failed_at = runs(tmp_path)
        # The same failure again is logged at debug level, not warned about each time.
        await until(lambda: runs(tmp_path) >= failed_at + 2, "two more failed runs")
        assert not following.done()
        (tmp_path / "fail").unlink()
        dsn_file.write_text(NEW)
        with anyio.fail_after(10):
            assert await following == NEW
    finally:
        await gen.aclose()
    (warning,) = warnings(log)
    assert str(program) in warning
    assert expected in warning
    assert "keeping the current DSN" in warning
    if failure != "bad JSON":  # there the output is not the program's error
        assert "stderr: connecting to postgresql://app:********@db/app failed | " in warning
    assert "hunter2" not in log.text
    assert "old-pw" not in log.text
    assert any("succeeded again" in r.getMessage() for r in log.records)


async def test_a_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    program = hanging_script(tmp_path)
    with pytest.raises(SourceError) as info:
        await first(program, timeout="300ms")
    assert str(info.value) == (
        f"command {str(program)!r} did not finish within 0.3s (timeout) and was killed; "
        "stderr: 1 line, not shown (may hold secrets; show_stderr=true shows them)"
    )
    assert reaped(int((tmp_path / "pid").read_text()))  # waited for before the error
    assert not our_zombies()
    await until(lambda: not alive_under(tmp_path), "the helper the script started is killed")


async def test_cancelling_a_run_kills_and_reaps_the_program(tmp_path: Path) -> None:
    program = hanging_script(tmp_path, first=OLD)
    gen = watch(program, **FAST)
    assert await anext(gen) == OLD
    following = asyncio.ensure_future(anext(gen))
    await until(lambda: len(alive_under(tmp_path)) == 2, "the second run and its helper")
    following.cancel()
    with pytest.raises(asyncio.CancelledError):
        await following
    await gen.aclose()
    assert reaped(int((tmp_path / "pid").read_text()))
    assert not our_zombies()
    await until(lambda: not alive_under(tmp_path), "the helper the script started is killed")


async def test_cancelling_while_the_program_starts_kills_and_reaps_it(tmp_path: Path) -> None:
    # White-box: _start is where asyncio alone would kill only the program and then wait
    # for the pipes its helper keeps open (30 s here).
    program = hanging_script(tmp_path)
    starting = asyncio.ensure_future(command._start(str(program), ()))
    with anyio.fail_after(10):
        while True:  # one step of the loop forks the program: look after every step
            if alive_under(tmp_path):
                break
            await asyncio.sleep(0)
    # Hold the loop until the program has started its helper, so asyncio is surely still
    # connecting the pipes when the cancellation comes.
    block_until(lambda: len(alive_under(tmp_path)) == 2, "the program's helper to start")
    assert not starting.done()
    starting.cancel()
    with anyio.fail_after(10), pytest.raises(asyncio.CancelledError):
        await starting
    assert not our_zombies()
    await until(lambda: not alive_under(tmp_path), "the program and its helper are killed")


# ---------------------------------------------------------------------------- at start


def _start_failures(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    stderr = f"echo 'cannot log in with {OLD}' >&2; echo 'password=old-pw-1' >&2"
    not_executable = tmp_path / "plain.txt"
    not_executable.write_text("#!/bin/sh\necho x\n")
    return {
        "non-zero exit": (
            script(tmp_path, f"{stderr}; exit 2", "exit.sh"),
            "exited with status 2; stderr: 2 lines, not shown (may hold secrets; "
            "show_stderr=true shows them)",
        ),
        "empty output": (script(tmp_path, "echo '  '", "empty.sh"), "printed no DSN"),
        "too much output": (
            script(tmp_path, "head -c 70000 /dev/zero | tr '\\0' x", "big.sh"),
            "printed more than 65536 bytes",
        ),
        "not UTF-8": (
            script(tmp_path, "printf 'postgresql://u:\\377@h/d'", "latin.sh"),
            "printed output that is not valid UTF-8",
        ),
        "JSON without host": (
            script(tmp_path, 'echo \'{"username": "u", "password": "old-pw-1"}\'', "json.sh"),
            "printed output that is a JSON object without 'host'",
        ),
        "missing": (tmp_path / "nope", "does not exist"),
        "not executable": (not_executable, "permission denied"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "non-zero exit",
        "empty output",
        "too much output",
        "not UTF-8",
        "JSON without host",
        "missing",
        "not executable",
    ],
)
async def test_a_failure_at_start_is_a_source_error(tmp_path: Path, case: str) -> None:
    program, expected = _start_failures(tmp_path)[case]
    with pytest.raises(SourceError) as info:
        await first(program)
    message = str(info.value)
    assert message.startswith(f"command {str(program)!r} ")
    assert expected in message
    assert "old-pw" not in message


async def test_long_stderr_is_cut_to_its_scrubbed_end(tmp_path: Path) -> None:
    program = script(
        tmp_path,
        "head -c 100000 /dev/zero | tr '\\0' x >&2; echo >&2\n"
        f"echo 'FATAL: cannot log in with {OLD}' >&2; exit 1",
    )
    with pytest.raises(SourceError) as info:
        await first(program, show_stderr="true")
    message = str(info.value)
    note = message.split("; stderr: ", 1)[1]
    assert note.startswith("...xxx")
    assert note.endswith("xxx | FATAL: cannot log in with postgresql://app:********@db:5432/app")
    assert len(note) == 500


# ---------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            {"nope": "1"},
            "unknown option 'nope' for the exec strategy; known: args, interval, show_stderr",
        ),
        ({"show_stderr": "maybe"}, "option 'show_stderr' must be a boolean"),
        ({"interval": "soon"}, "option 'interval' must be a duration > 0"),
        ({"interval": "0"}, "option 'interval' must be a duration > 0"),
        ({"timeout": "-1s"}, "option 'timeout' must be a duration > 0"),
        ({"args": "--token=s3cret 'unclosed"}, "option 'args' is not valid shell-style quoting"),
    ],
)
async def test_bad_options_are_rejected(
    tmp_path: Path, options: dict[str, str], expected: str
) -> None:
    program = script(tmp_path, "touch \"$DIR/ran\"; echo 'postgresql://h/d'")
    with pytest.raises(InvalidOptionError) as info:
        await first(program, **options)
    assert expected in str(info.value)
    assert "s3cret" not in str(info.value)
    assert not (tmp_path / "ran").exists()  # rejected before anything runs


@pytest.mark.parametrize("path", ["relative/dsn.sh", "dsn.sh"])
async def test_a_relative_path_is_rejected(path: str) -> None:
    with pytest.raises(InvalidURLError, match="absolute path"):
        await first(path)


async def test_the_program_inherits_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Credential helpers find their own credentials (AWS_PROFILE, VAULT_TOKEN) this way.
    monkeypatch.setenv("AIOHOTLOAD_TEST_TOKEN", "postgresql://from-env/db")
    program = script(tmp_path, 'echo "$AIOHOTLOAD_TEST_TOKEN"')
    assert await first(program) == "postgresql://from-env/db"
    assert os.environ["AIOHOTLOAD_TEST_TOKEN"]  # not consumed or altered


# ---------------------------------------------------------------------------- stderr secrecy

FRESH = "Fr3sh-Pw-9q"
# How helpers leak a fresh password on standard error: shell traces (set -x), env dumps,
# JSON and YAML, command-line flags, the DSN itself.
LEAKY_STDERR = f"""set -x
PGPASSWORD={FRESH} true
DB_PASSWORD='{FRESH}'
export DB_PASSWORD
echo '{{"username": "app", "password": "{FRESH}"}}' >&2
echo 'password: {FRESH}' >&2
echo 'psql --password {FRESH} -h db' >&2
echo 'postgresql://app:{FRESH}@db/app' >&2
echo "login as app with {FRESH} refused" >&2
exit 1"""


@pytest.mark.parametrize("show", [False, True])
async def test_stderr_never_shows_a_fresh_password(tmp_path: Path, show: bool) -> None:
    # The run fails, so FRESH is known only from stderr (except in the last, bare line,
    # which only the default hides: no pattern can tell it is a password).
    program = script(tmp_path, LEAKY_STDERR.replace(f"with {FRESH}", "with a password"))
    options = {"show_stderr": "true"} if show else {}
    with pytest.raises(SourceError) as info:
        await first(program, **options)
    message = str(info.value)
    assert_no_piece_of(FRESH, message)
    if show:
        assert "+ PGPASSWORD=******** true" in message
        assert "login as app with a password refused" in message
    else:
        assert re.search(
            r"exited with status 1; stderr: \d+ lines, not shown \(may hold secrets; "
            r"show_stderr=true shows them\)$",
            message,
        )


async def test_a_later_failure_hides_the_current_password_even_in_part(
    tmp_path: Path, dsn_file: Path, log: pytest.LogCaptureFixture
) -> None:
    # A helper quoting a piece of the password in use, in a bare word: only the pieces
    # tell it apart.
    program = script(
        tmp_path,
        'if [ -e "$DIR/fail" ]; then echo "bad token old-pw (from old-pw-1x)" >&2; exit 1; fi\n'
        'cat "$DIR/dsn"',
    )
    gen = watch(program, interval="20ms", show_stderr="true")
    try:
        assert await anext(gen) == OLD
        following = asyncio.ensure_future(anext(gen))
        (tmp_path / "fail").touch()
        await until(lambda: bool(warnings(log)), "a warning")
        following.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await following
    finally:
        await gen.aclose()
    (warning,) = warnings(log)
    assert "bad token" in warning
    assert_no_piece_of("old-pw-1", warning)


_LEAK_SHAPES = [
    "PGPASSWORD={sh}",
    "+ PGPASSWORD={sh} psql -h db",
    "+ export {sh_assign}",
    "DB_PASSWORD={sh}",
    '{{"username": "app", "password": {js}}}',
    "password: {yaml}",
    "psql --password {sh} -h db",
    "+ psql postgresql://app:{enc}@db/app",
    "could not log in as app with {pw} (current DSN)",
]


@given(
    pw=st.text(
        alphabet=st.one_of(
            st.characters(exclude_categories=["Cs"]), st.sampled_from([*"'\"\\ $=:@/?#&{}"])
        ),
        min_size=4,
        max_size=20,
    ),
    shape=st.sampled_from(_LEAK_SHAPES),
)
@example(pw="it's a pw", shape="+ export {sh_assign}")
@example(pw='x"y\\z w', shape='{{"username": "app", "password": {js}}}')
def test_scrubbed_stderr_holds_no_piece_of_a_password(pw: str, shape: str) -> None:
    line = shape.format(
        pw=pw,
        sh=shlex.quote(pw),
        sh_assign=shlex.quote(f"DB_PASSWORD={pw}"),
        js=json.dumps(pw),
        yaml=json.dumps(pw) if pw != pw.strip() or set(pw) & set("\n\r\"'#:") else pw,
        enc=quote(pw, safe=""),
    )
    fixed = f"noise before\n{shape}\nnoise after"
    assume(not leaked(pw, fixed + REDACTED))
    known = f"postgresql://app:{quote(pw, safe='')}@db/app"  # the DSN in use holds it
    err = f"noise before\n{line}\nnoise after".encode()
    shown = command._scrubbed_tail(err, b"", known)
    assert_no_piece_of(pw, shown)
    assert shown.startswith("noise before | ")


# ---------------------------------------------------------------------------- refresh


async def test_a_refresh_runs_the_program_at_once(tmp_path: Path, dsn_file: Path) -> None:
    program = script(tmp_path, 'echo run >> "$DIR/runs"; cat "$DIR/dsn"')
    feedback = Feedback()
    gen = ExecStrategy().watch(str(program), {"interval": "1h"}, feedback=feedback)
    try:
        assert await anext(gen) == OLD
        dsn_file.write_text(NEW)
        feedback.request_refresh()  # an hour early
        with anyio.fail_after(10):
            assert await anext(gen) == NEW
    finally:
        await gen.aclose()
    assert runs(tmp_path) == 2


async def test_refreshes_run_the_program_at_most_once_a_floor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(command, "_REFRESH_FLOOR", 0.3)
    started: list[float] = []
    start = command._start

    async def recorded(program: str, args: tuple[str, ...]) -> asyncio.subprocess.Process:
        started.append(time.monotonic())  # when the run began, as the strategy counts it
        return await start(program, args)

    monkeypatch.setattr(command, "_start", recorded)
    program = script(tmp_path, "echo postgresql://app:pw@db/app")
    feedback = Feedback()
    gen = ExecStrategy().watch(str(program), {"interval": "1h"}, feedback=feedback)
    following = None
    try:
        assert await anext(gen) == "postgresql://app:pw@db/app"
        following = asyncio.ensure_future(anext(gen))  # runs go on while it waits
        # A refused login on every connection attempt: refreshes asked for all the time.
        with anyio.fail_after(20):
            while len(started) < 4:
                feedback.request_refresh()
                await asyncio.sleep(0.005)
    finally:
        if following is not None:
            following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await following
        await gen.aclose()
    gaps = [b - a for a, b in itertools.pairwise(started)]
    assert min(gaps) >= 0.3 - 0.01, gaps
