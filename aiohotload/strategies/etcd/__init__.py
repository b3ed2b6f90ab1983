"""The ``etcd`` strategy: a DSN kept in an etcd v3 key, followed through etcd's watch API.

``etcd://postgres/<key>?endpoints=10.0.0.1:2379,10.0.0.2:2379``: the key's value is the DSN.

- ``_options``: the URL's options, the key, the TLS context.
- ``_client``: a client for etcd's JSON gateway (reads and watches of one key) over httpx.
- ``_shared_watch``: one watch per event loop, key and options, shared by the pools on it,
  which leaves a member that stops answering.
- ``_strategy``: :class:`EtcdStrategy`, turning the key's values into DSNs.
"""

from __future__ import annotations

from ._strategy import EtcdStrategy

__all__ = ["EtcdStrategy"]
