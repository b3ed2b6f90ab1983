"""Helpers for tests that prove no secret leaks: pieces of a password in a text."""

from __future__ import annotations

#: The length from which a piece of a password counts as leaked.
PIECE = 4


def pieces(secret: str) -> set[str]:
    """Every substring of *secret* ``PIECE`` characters long (longer ones contain one)."""
    return {secret[i : i + PIECE] for i in range(len(secret) - PIECE + 1)}


def leaked(secret: str, text: str) -> list[str]:
    """The pieces of *secret* found in *text*, sorted (empty when nothing leaked)."""
    return sorted(p for p in pieces(secret) if p in text)


def assert_no_piece_of(secret: str, *texts: str) -> None:
    """No substring of *secret* ``PIECE`` or more characters long is in any of *texts*."""
    for text in texts:
        found = leaked(secret, text)
        assert not found, (found, text)
