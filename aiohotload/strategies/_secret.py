"""DSNs from secret values: a DSN as is, or the JSON AWS rotation functions write.

AWS Secrets Manager's rotation functions for RDS keep a database secret as a JSON object,
``{"engine": "postgres", "host": ..., "port": 5432, "username": ..., "password": ...,
"dbname": ...}``; credential helpers (``credential_process`` wrappers) often print the same.
"""

from __future__ import annotations

import json
import re
from urllib.parse import quote

__all__ = ["SecretFormatError", "dsn_from_secret", "passwords_in_secret"]

_DEFAULT_PORT = 5432
_DIGITS = re.compile(r"\s*[0-9]{1,5}\s*")


class SecretFormatError(Exception):
    """A secret value that holds no usable DSN; the reason never quotes the value."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def dsn_from_secret(text: str) -> str:
    """The DSN a secret value stands for: a JSON object of the AWS shape is turned into a
    ``postgresql://`` URL (user and password percent-encoded); anything else is the DSN."""
    text = text.strip()
    if not text:
        raise SecretFormatError("is empty")
    if not text.startswith("{"):
        return text
    try:
        data = json.loads(text)
    except ValueError:
        # Not echoing json's message: it quotes the text around the fault, the password maybe.
        raise SecretFormatError("starts with '{' but is not valid JSON") from None
    if not isinstance(data, dict):
        raise SecretFormatError("is JSON but not an object")
    return _dsn_from_fields(data)


def passwords_in_secret(text: str) -> tuple[str, ...]:
    """The password in a JSON secret, as written and percent-encoded, for scrubbing text
    with :func:`~aiohotload.redact.redact_text`; empty if there is none."""
    try:
        data = json.loads(text)
    except ValueError:
        return ()
    password = data.get("password") if isinstance(data, dict) else None
    if not isinstance(password, str) or not password:
        return ()
    return (password, quote(password, safe=""))


def _dsn_from_fields(data: dict[str, object]) -> str:
    engine = data.get("engine")
    if engine is not None and (not isinstance(engine, str) or "postgres" not in engine.lower()):
        # Engine names are not secret and say at once why the DSN cannot work.
        shown = engine if isinstance(engine, str) else type(engine).__name__
        raise SecretFormatError(f"is for engine {shown!r}, not PostgreSQL")
    host = _text(data, "host", required=True)
    user = _text(data, "username", required=True)
    password = _text(data, "password")
    dbname = _text(data, "dbname")
    port = _port(data.get("port"))
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    userinfo = quote(user, safe="")
    if password:
        userinfo += ":" + quote(password, safe="")
    path = "/" + quote(dbname, safe="") if dbname else ""
    return f"postgresql://{userinfo}@{host}:{port}{path}"


def _text(data: dict[str, object], key: str, *, required: bool = False) -> str:
    value = data.get(key)
    if value is None or value == "":
        if required:
            raise SecretFormatError(f"is a JSON object without {key!r}")
        return ""
    if not isinstance(value, str):
        raise SecretFormatError(f"has {key!r} of type {type(value).__name__}, not a string")
    return value


def _port(value: object) -> int:
    if value is None or value == "":
        return _DEFAULT_PORT
    # RDS writes the port as a number; people who write the JSON by hand often quote it.
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise SecretFormatError("has a 'port' that is not a number from 1 to 65535")
    return value
