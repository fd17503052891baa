"""Hook implementations of ``lmserve serve ray``: engine replicas on Ray Serve behind one ingress.

The ingress is the api_server itself (the same routes, the same bus); only its
backend differs: :class:`~lmserve.backends.ray.backend.ServeBackend`, which sends
each request to a replica. Ray is imported only by that command
(``pip install lmserve[ray]``).
"""

from __future__ import annotations

import argparse

from lmserve.core import hookimpl
from lmserve.core.config import SERVE_RAY, ServeConfig
from lmserve.core.model_source import ModelSource

#: The response header that names the replica(s) that served a request.
REPLICA_HEADER = "x-lmserve-replica"

_deployed_app: str | None = None


def is_ray_command(config: ServeConfig) -> bool:
    return config.options.get("command") == "serve" and config.options.get("server") == "ray"


@hookimpl
def lmserve_add_cli_options(command: str, parser: argparse.ArgumentParser) -> None:
    if command != SERVE_RAY:
        return
    from lmserve.backends.ray.deployment import RayOptions

    group = parser.add_argument_group("ray")
    group.add_argument("--address", default=RayOptions.address, metavar="ADDRESS",
                       help="The Ray cluster to join: HOST:PORT of its head (after `ray start --head`), "
                       "ray://HOST:PORT, or auto (the one this machine runs). Default: start one here.")
    group.add_argument("--num-replicas", type=int, default=RayOptions.num_replicas, metavar="N",
                       help="Engine replicas, each a whole copy of the model.")
    group.add_argument("--min-replicas", type=int, default=RayOptions.min_replicas, metavar="N",
                       help="With --max-replicas: autoscale between them on the requests each replica has "
                       "(starting at --num-replicas).")
    group.add_argument("--max-replicas", type=int, default=RayOptions.max_replicas, metavar="N",
                       help="See --min-replicas.")
    group.add_argument("--target-ongoing-requests", type=float, default=RayOptions.target_ongoing_requests,
                       metavar="N", help="Autoscaling aims at this many requests in flight per replica.")
    group.add_argument("--num-cpus-per-replica", type=float, default=RayOptions.num_cpus_per_replica,
                       metavar="N", help="CPUs Ray reserves for each replica; its engine's ranks share them "
                       "as threads (unless --cpu-threads says otherwise).")
    group.add_argument("--num-gpus-per-replica", type=float, default=RayOptions.num_gpus_per_replica, metavar="N",
                       help="GPUs Ray reserves for each replica (default: --tp where the cluster has GPUs, else 0).")
    group.add_argument("--max-ongoing-requests", type=int, default=RayOptions.max_ongoing_requests, metavar="N",
                       help="Most requests one replica takes at once; more wait at the ingress.")
    group.add_argument("--ray-num-cpus", type=int, default=RayOptions.ray_num_cpus, metavar="N",
                       help="CPUs of the cluster started here (default: the machine's); ignored with --address.")
    group.add_argument("--app-name", default=RayOptions.app_name, metavar="NAME",
                       help="The Serve application's name on the cluster (one per lmserve ingress).")


@hookimpl
def lmserve_configure(config: ServeConfig) -> None:
    if is_ray_command(config):
        from lmserve.backends.ray.deployment import RayOptions, authenticate_with_token_if_any

        options = RayOptions.from_options(config.options)  # bad flags fail here, before anything loads
        if options.address is not None:
            authenticate_with_token_if_any()  # before anything starts a thread or imports Ray


@hookimpl
def lmserve_make_backend(config: ServeConfig, source: ModelSource):
    if not is_ray_command(config):
        return None
    from lmserve.backends.ray.backend import ServeBackend
    from lmserve.backends.ray.deployment import RayOptions, deploy

    global _deployed_app
    options = RayOptions.from_options(config.options)
    handle, info = deploy(config, options)
    _deployed_app = options.app_name
    return ServeBackend(handle, info)


@hookimpl
def lmserve_register_routes(app, state) -> None:
    if not is_ray_command(state.config):
        return
    from lmserve.backends.ray.backend import request_replicas

    @app.on_request
    async def track_replicas(request):
        request_replicas.set([])

    @app.on_response
    async def name_replicas(request, response):
        replicas = request_replicas.get()
        if replicas:
            response.headers[REPLICA_HEADER] = ",".join(dict.fromkeys(replicas))


@hookimpl
def lmserve_shutdown() -> None:
    global _deployed_app
    if _deployed_app is not None:
        from lmserve.backends.ray.deployment import teardown

        teardown(_deployed_app)
        _deployed_app = None
