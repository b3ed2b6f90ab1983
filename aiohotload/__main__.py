"""``python -m aiohotload``: the ``aiohotload`` command (see :mod:`aiohotload.cli`)."""

from .cli import main

raise SystemExit(main())
