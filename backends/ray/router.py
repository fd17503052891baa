"""Which replica serves a request: Ray Serve's routing, with sessions kept on their replica.

The rules, in order:

1. a request pinned to a replica (a later turn of an interactive session: the
   ingress remembers which replica holds its keys and values) goes to that
   replica, and to no other while it lives; when it is gone the request goes
   where rule 2 sends it, and that replica refuses it (it does not hold the session);
2. an interactive session's first turn goes to the replica that ranks first by
   rendezvous hashing of its session key: every ingress computes the same
   answer from the live replica ids alone, with no shared state, and a replica
   that joins or leaves moves only the sessions it wins or held; the other
   replicas follow in rank order when that one is full;
3. any other request goes to the less loaded of two replicas chosen at random
   (power of two choices, Serve's own default).
"""

from __future__ import annotations

import hashlib
import random
from typing import Iterable

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

# A module, not its dict: Serve pickles this module by value, its imports by reference.
from lmserve.backends.ray import live_replicas

#: The keyword arguments of a request that routing reads.
PINNED_REPLICA = "replica"
SESSION_KEY = "session_key"


def rendezvous_order(key: str, replica_ids: Iterable[str]) -> list[str]:
    """``replica_ids`` by their rendezvous score for ``key``, the winner first.

    The score is a hash of key and replica id, the same in every process."""
    def score(replica_id: str) -> int:
        return int.from_bytes(hashlib.blake2b(f"{key}\0{replica_id}".encode(), digest_size=8).digest(), "big")

    return sorted(replica_ids, key=score, reverse=True)


class SessionAffinityRouter(FIFOMixin, RequestRouter):
    """A Serve request router that follows the module's rules."""

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live_replicas.seen(self._deployment_id.name, (r.replica_id.unique_id for r in replicas))

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        live_replicas.died(self._deployment_id.name, replica_id.unique_id)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        kwargs = pending_request.kwargs if pending_request is not None else {}
        pinned = kwargs.get(PINNED_REPLICA)
        if pinned in by_id:
            return [[by_id[pinned]]]
        key = kwargs.get(SESSION_KEY)
        if key is not None:
            return [[by_id[replica_id]] for replica_id in rendezvous_order(key, by_id)]
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
