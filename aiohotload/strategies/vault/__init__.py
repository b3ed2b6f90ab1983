"""The ``vault`` strategy: database credentials and DSNs from HashiCorp Vault or OpenBao.

``vault://postgres/database/creds/app?host=db.internal&dbname=app`` leases credentials from
the database secrets engine, renews the lease, moves the pool to new credentials before the
lease ends and revokes the old lease once the pool has drained it. Static roles
(``database/static-creds/<role>``) and KV v2 secrets (``secret/data/<path>``) work too.

It speaks Vault's HTTP API over httpx (``pip install 'aiohotload[vault]'``): the modules
are the HTTP client (``_client``), the token (``_auth``), lease timing (``_leases``), one
module per kind of secret (``_dynamic``, ``_static``, ``_kv``) and the strategy on top.
"""

from __future__ import annotations

try:
    import httpx  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("the vault strategy needs httpx: pip install 'aiohotload[vault]'") from exc

from .strategy import VaultStrategy

__all__ = ["VaultStrategy"]
