"""The replica ids the request routers of this process see live, by deployment name.

Serve builds the routers from a copy of their class (pickled by value), so the
ingress cannot read them directly; they report here instead, and the ingress's
backend learns from here that a replica holding sessions is gone. Each entry is a
``frozenset`` replaced whole: safe to read from any thread.
"""

from __future__ import annotations

_live: dict[str, frozenset[str]] = {}


def seen(deployment: str, replica_ids) -> None:
    """The router's replicas changed: these are the live ones now."""
    _live[deployment] = frozenset(replica_ids)


def died(deployment: str, replica_id: str) -> None:
    """A call found the replica's actor dead (before the controller said so)."""
    _live[deployment] = _live.get(deployment, frozenset()) - {replica_id}


def of(deployment: str) -> frozenset[str] | None:
    """The live replica ids of ``deployment``; None before its router first heard of any."""
    return _live.get(deployment)
