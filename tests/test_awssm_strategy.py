"""The awssm strategy without AWS: option checks, the polling backoff against a scripted
client, and the message when aiobotocore is missing. Against a server: integration_tests."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import anyio
import pytest

from aiohotload.errors import InvalidOptionError, InvalidURLError, StrategyError
from aiohotload.strategies import Feedback, Strategy, awssm
from aiohotload.strategies.awssm import AwsSecretsManagerStrategy

LOGGER = "aiohotload.strategies.awssm"


def watch(path: str = "/app/db", **options: str) -> AsyncGenerator[str, None]:
    return AwsSecretsManagerStrategy().watch(path, {"region": "us-east-1", **options})


async def first(path: str = "/app/db", **options: str) -> str:
    async with aclosing(watch(path, **options)) as gen:
        with anyio.fail_after(10):
            return await anext(gen)


def test_is_a_strategy() -> None:
    assert isinstance(AwsSecretsManagerStrategy(), Strategy)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"nope": "1"}, "unknown option 'nope' for the awssm strategy; known: endpoint_url"),
        ({"region": "US East"}, "option 'region' must be an AWS region such as 'us-east-1'"),
        ({"region": ""}, "option 'region' must be an AWS region"),
        ({"interval": "0"}, "option 'interval' must be a duration > 0"),
        ({"timeout": "soon"}, "option 'timeout' must be a duration > 0"),
        ({"endpoint_url": "ftp://h"}, "option 'endpoint_url' must be an http:// or https://"),
        ({"endpoint_url": "http://"}, "option 'endpoint_url' must be an http:// or https://"),
        ({"endpoint_url": "http://h:99999"}, "option 'endpoint_url' must be an http://"),
        ({"version_stage": " "}, "option 'version_stage' must be a staging label"),
    ],
)
async def test_bad_options_are_rejected(options: dict[str, str], expected: str) -> None:
    with pytest.raises(InvalidOptionError) as info:
        await first(**options)
    assert expected in str(info.value)


@pytest.mark.parametrize("path", ["/", "", "/" + "x" * 2049])
async def test_a_bad_secret_id_is_rejected(path: str) -> None:
    with pytest.raises(InvalidURLError, match="secret"):
        await first(path)


async def test_missing_aiobotocore_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A None entry in sys.modules makes the import fail, as if the package were absent.
    monkeypatch.setitem(sys.modules, "aiobotocore.session", None)
    with pytest.raises(StrategyError, match=r"pip install 'aiohotload\[aws\]'"):
        await first()


# ---------------------------------------------------------------------------- backoff


class ScriptedClient:
    """Answers get_secret_value from a list: a dict is a response, an exception is raised."""

    def __init__(self, answers: list[object]) -> None:
        self.answers = answers
        self.calls: list[dict[str, Any]] = []

    async def get_secret_value(self, **kwargs: Any) -> object:
        self.calls.append(kwargs)
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def version(version_id: str, dsn: str) -> dict[str, object]:
    return {"VersionId": version_id, "SecretString": dsn}


def client_error(code: str, status: int = 400) -> Exception:
    exceptions = pytest.importorskip("botocore.exceptions")
    response = {"Error": {"Code": code, "Message": f"{code} here."}}
    error: Exception = exceptions.ClientError(
        {**response, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetSecretValue"
    )
    return error


@pytest.fixture
def backoff(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The count of consecutive failures each wait between polls was computed from; the
    waits themselves are cut to nothing."""
    seen: list[int] = []
    real = awssm._delay

    def delay(interval: float, failures: int, *, jitter: bool = True) -> float:
        if not jitter:  # the figure shown in a log message
            return real(interval, failures, jitter=False)
        seen.append(failures)
        return 0.0

    monkeypatch.setattr(awssm, "_delay", delay)
    return seen


def use_client(monkeypatch: pytest.MonkeyPatch, client: ScriptedClient) -> None:
    async def open_client(stack: contextlib.AsyncExitStack, opts: object) -> ScriptedClient:
        return client

    monkeypatch.setattr(awssm, "_open_client", open_client)


async def test_throttling_and_server_errors_back_off_exponentially(
    monkeypatch: pytest.MonkeyPatch, backoff: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    client = ScriptedClient(
        [
            version("v1", "postgresql://u:one@h/d"),
            client_error("ThrottlingException"),
            client_error("ThrottlingException"),
            client_error("TooManyRequestsException", 429),
            client_error("InternalServiceError", 500),
            version("v2", "postgresql://u:two@h/d"),
            client_error("AccessDeniedException"),
            client_error("AccessDeniedException"),
            version("v3", "postgresql://u:three@h/d"),
        ]
    )
    use_client(monkeypatch, client)
    async with aclosing(watch(interval="60s", version_stage="AWSPENDING")) as gen:
        with anyio.fail_after(10):
            assert await anext(gen) == "postgresql://u:one@h/d"
            assert await anext(gen) == "postgresql://u:two@h/d"
            assert await anext(gen) == "postgresql://u:three@h/d"
    # Doubling while throttled or failing transiently; a denial is not retried faster or
    # slower than the interval.
    assert backoff == [0, 1, 2, 3, 4, 0, 0, 0]
    assert all(c == {"SecretId": "app/db", "VersionStage": "AWSPENDING"} for c in client.calls)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "cannot read AWS secret 'app/db' (AWSPENDING): ThrottlingException: "
        "ThrottlingException here; keeping the current DSN, next poll in 120.0s",
        "cannot read AWS secret 'app/db' (AWSPENDING): TooManyRequestsException: "
        "TooManyRequestsException here; keeping the current DSN, next poll in 300.0s",
        "cannot read AWS secret 'app/db' (AWSPENDING): InternalServiceError: "
        "InternalServiceError here; keeping the current DSN, next poll in 300.0s",
        "cannot read AWS secret 'app/db' (AWSPENDING): AccessDeniedException: "
        "AccessDeniedException here; keeping the current DSN, next poll in 60.0s",
    ]
    assert "one" not in caplog.text
    assert "three" not in caplog.text


async def test_an_unchanged_or_unusable_version_yields_nothing(
    monkeypatch: pytest.MonkeyPatch, backoff: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    client = ScriptedClient(
        [
            version("v1", "postgresql://u:one@h/d"),
            version("v1", "postgresql://u:one@h/d"),
            version("v2", '{"engine": "mysql", "host": "h", "username": "u"}'),
            version("v2", '{"engine": "mysql", "host": "h", "username": "u"}'),
            version("v3", " postgresql://u:one@h/d "),  # a new version, the same DSN
            version("v4", "postgresql://u:four@h/d"),
        ]
    )
    use_client(monkeypatch, client)
    async with aclosing(watch()) as gen:
        with anyio.fail_after(10):
            assert await anext(gen) == "postgresql://u:one@h/d"
            assert await anext(gen) == "postgresql://u:four@h/d"
    assert not client.answers
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning == (
        "AWS secret 'app/db' (AWSCURRENT), version v2, is for engine 'mysql', not PostgreSQL; "
        "keeping the current DSN"
    )


@pytest.mark.parametrize(
    ("interval", "failures", "expected"),
    [(60, 0, 60), (60, 1, 120), (60, 2, 240), (60, 3, 300), (60, 99, 300), (600, 2, 600)],
)
def test_delay_doubles_up_to_a_cap(interval: float, failures: int, expected: float) -> None:
    assert awssm._delay(interval, failures, jitter=False) == expected
    assert 0.9 * expected <= awssm._delay(interval, failures) <= 1.1 * expected


# ---------------------------------------------------------------------------- refresh


async def test_a_refresh_request_polls_now_instead_of_at_the_interval(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    client = ScriptedClient(
        [
            version("v1", "postgresql://u:one@h/d"),
            version("v2", "postgresql://u:two@h/d"),
            version("v3", "postgresql://u:three@h/d"),
        ]
    )
    use_client(monkeypatch, client)
    feedback = Feedback()
    options = {"region": "us-east-1", "interval": "1h"}
    gen = AwsSecretsManagerStrategy().watch("/app/db", options, feedback=feedback)
    async with aclosing(gen):
        with anyio.fail_after(10):  # far from the hour the interval would take
            assert await anext(gen) == "postgresql://u:one@h/d"
            feedback.request_refresh()
            assert await anext(gen) == "postgresql://u:two@h/d"
            feedback.release("postgresql://u:one@h/d")  # no lease to free
            feedback.request_refresh()
            assert await anext(gen) == "postgresql://u:three@h/d"
    assert not client.answers
    asked = [m for m in caplog.messages if "the pool asked for a fresh AWS secret" in m]
    assert len(asked) == 2


@pytest.mark.parametrize(
    ("asked", "backing_off", "expected"),
    [
        (False, False, 3600.0),  # not asked: the interval
        (True, False, 1.0),  # asked: after the floor since the last poll
        (True, True, 3600.0),  # throttled or failing: the backoff stands
    ],
)
def test_next_poll_when_asked(asked: bool, backing_off: bool, expected: float) -> None:
    assert awssm._next_poll(0.0, 3600.0, asked=asked, backing_off=backing_off) == expected
    # A poll due sooner than the floor stays due then.
    assert awssm._next_poll(0.0, 0.5, asked=asked, backing_off=backing_off) == 0.5
