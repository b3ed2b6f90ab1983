"""Exit codes of the ``aiohotload`` command, shared by its subcommands and the demo."""

from __future__ import annotations

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_TERMINATED", "EXIT_USAGE"]

EXIT_OK = 0
#: ``check`` could not connect; the demo had failed queries or could not start.
EXIT_FAILED = 1
#: Bad arguments or a bad hotload URL (malformed, unknown strategy/driver/option).
EXIT_USAGE = 2
#: Ctrl-C (SIGINT: 128 + 2), after stopping cleanly.
EXIT_INTERRUPTED = 130
#: SIGTERM (128 + 15), after stopping cleanly.
EXIT_TERMINATED = 143
