"""The Ray backend's parts that need no cluster: routing rules, options, the replica's config."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from lmserve.backends.ray.deployment import RAY_OPTIONS, RayOptions, replica_config
from lmserve.backends.ray.plugin import is_ray_command
from lmserve.backends.ray.router import PINNED_REPLICA, SESSION_KEY, SessionAffinityRouter, rendezvous_order
from lmserve.core.config import ServeConfig
from lmserve.core.plugins import create_plugin_manager
from lmserve.frontends.cli import build_parser, main

KEYS = [f"session-{i}" for i in range(2000)]


def winners(replicas):
    return {key: rendezvous_order(key, replicas)[0] for key in KEYS}


def test_rendezvous_spreads_keys_and_moves_only_what_a_change_must():
    three = winners(["a", "b", "c"])
    counts = {replica: list(three.values()).count(replica) for replica in "abc"}
    assert all(550 < count < 780 for count in counts.values()), counts
    four = winners(["a", "b", "c", "d"])
    moved = [key for key in KEYS if three[key] != four[key]]
    assert all(four[key] == "d" for key in moved), "a new replica only takes keys, it moves none between others"
    two = winners(["a", "c"])
    assert all(two[key] == three[key] for key in KEYS if three[key] != "b"), "only the gone replica's keys move"


def test_rendezvous_is_the_same_in_any_order_and_any_process():
    assert rendezvous_order("session-7", ["x", "y", "z"]) == rendezvous_order("session-7", ["z", "y", "x"])
    # A fixed hash (not Python's salted hash()): every ingress ranks alike.
    code = "from lmserve.backends.ray.router import rendezvous_order as r; print(r('session-7', 'xyz'))"
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert runs == {f"{rendezvous_order('session-7', 'xyz')}\n"}


def replica(unique_id):
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=unique_id))


def choose(candidates, **kwargs):
    router = object.__new__(SessionAffinityRouter)  # the rules need none of Serve's state
    request = SimpleNamespace(kwargs=kwargs)
    ranks = asyncio.run(router.choose_replicas(candidates, request))
    return [[r.replica_id.unique_id for r in rank] for rank in ranks]


def test_the_router_pins_a_session_to_its_replica_while_it_lives():
    candidates = [replica("a"), replica("b"), replica("c")]
    assert choose(candidates, **{PINNED_REPLICA: "b", SESSION_KEY: "session-1"}) == [["b"]]


def test_a_pinned_replica_that_is_gone_falls_back_to_the_rendezvous_order():
    candidates = [replica("a"), replica("c")]
    ranks = choose(candidates, **{PINNED_REPLICA: "b", SESSION_KEY: "session-1"})
    assert ranks == [[r] for r in rendezvous_order("session-1", ["a", "c"])]


def test_a_new_session_goes_to_its_rendezvous_winner_first():
    candidates = [replica("a"), replica("b"), replica("c")]
    ranks = choose(candidates, **{SESSION_KEY: "session-42", PINNED_REPLICA: None})
    assert ranks == [[r] for r in rendezvous_order("session-42", ["a", "b", "c"])]


def test_other_requests_get_two_random_choices():
    candidates = [replica("a"), replica("b"), replica("c")]
    seen = set()
    for _ in range(60):
        (rank,) = choose(candidates, **{SESSION_KEY: None, PINNED_REPLICA: None})
        assert len(rank) == 2 and len(set(rank)) == 2
        seen.update(rank)
    assert seen == {"a", "b", "c"}
    assert choose([], **{SESSION_KEY: None}) == []


@pytest.mark.parametrize("options, message", [
    ({"num_replicas": 0}, "--num-replicas must be at least 1"),
    ({"min_replicas": 1}, "--min-replicas and --max-replicas go together"),
    ({"min_replicas": 3, "max_replicas": 2}, "--min-replicas must be in"),
    ({"target_ongoing_requests": 0}, "--target-ongoing-requests must be above 0"),
    ({"num_cpus_per_replica": 0}, "--num-cpus-per-replica must be above 0"),
    ({"num_gpus_per_replica": -1}, "--num-gpus-per-replica must be at least 0"),
    ({"max_ongoing_requests": 0}, "--max-ongoing-requests must be at least 1"),
])
def test_bad_ray_options_are_refused_with_the_flag_named(options, message):
    with pytest.raises(ValueError, match=message):
        RayOptions.from_options(options)


def test_unset_options_take_the_defaults_and_autoscaling_needs_both_bounds():
    options = RayOptions.from_options({"num_replicas": 3, "min_replicas": None, "address": None})
    assert options.num_replicas == 3 and not options.autoscaling and options.address is None
    assert RayOptions.from_options({"min_replicas": 0, "max_replicas": 4}).autoscaling


def serve_ray_config(*argv):
    pm = create_plugin_manager()
    args = build_parser(pm).parse_args(["serve", "ray", "some-model", *argv])
    return ServeConfig(model=args.model, plugins=tuple(args.plugin), options=vars(args))


def test_a_replica_builds_a_local_engine_from_the_ingress_config():
    config = serve_ray_config("--num-replicas", "2", "--dtype", "float32", "--cache-max-entry-count", "64",
                              "--num-cpus-per-replica", "3")
    assert is_ray_command(config)
    fields = replica_config(config, cpu_threads=3)
    replica = ServeConfig(**fields)
    assert not is_ray_command(replica), "a replica must build its engine, not more replicas"
    assert not set(RAY_OPTIONS) & set(replica.options)
    assert replica.options["cache_max_entry_count"] == 64 and replica.options["cpu_threads"] == 3
    assert replica.model == "some-model"
    explicit = replica_config(serve_ray_config("--cpu-threads", "1"), cpu_threads=3)
    assert explicit["options"]["cpu_threads"] == 1, "--cpu-threads wins over the replica's CPUs"


def test_bad_ray_flags_fail_before_anything_loads(capsys):
    assert main(["serve", "ray", "no-such-model", "--min-replicas", "1", "--server-port", "0"]) == 2
    assert "--min-replicas and --max-replicas go together" in capsys.readouterr().err
