"""The engine deployment on a Ray cluster: join or start the cluster, deploy, tear down."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from lmserve.backends.torch.engine_config import EngineConfig
from lmserve.core.config import ServeConfig, settings_from_options
from lmserve.core.plugins import PluginError

logger = logging.getLogger(__name__)

#: Seconds between Serve's health checks of a replica: a dead one is noticed (and
#: replaced, and its sessions reported lost) within about this long.
HEALTH_CHECK_PERIOD_S = 2.0
#: A replica that takes longer than this to answer a health check is replaced.
HEALTH_CHECK_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RayOptions:
    """What ``lmserve serve ray`` asks of Ray: where, how many replicas, what each one gets."""

    address: str | None = None  # None: start a cluster on this machine
    num_replicas: int = 1
    min_replicas: int | None = None  # with max_replicas: autoscale between them
    max_replicas: int | None = None
    target_ongoing_requests: float = 16.0
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float | None = None  # None: --tp GPUs where the cluster has GPUs, else 0
    max_ongoing_requests: int = 256
    ray_num_cpus: int | None = None  # the local cluster's CPUs (None: the machine's)
    app_name: str = "lmserve"

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> RayOptions:
        """The Ray settings among ``options`` (parsed flags by dest name); absent or None: the default."""
        return settings_from_options(cls, options)

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"--num-replicas must be at least 1, got {self.num_replicas}.")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("--min-replicas and --max-replicas go together (autoscaling between them).")
        if self.min_replicas is not None and not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"--min-replicas must be in [0, --max-replicas], got {self.min_replicas} "
                             f"and {self.max_replicas}.")
        if self.max_replicas is not None and self.max_replicas < 1:
            raise ValueError(f"--max-replicas must be at least 1, got {self.max_replicas}.")
        if not self.target_ongoing_requests > 0:
            raise ValueError(f"--target-ongoing-requests must be above 0, got {self.target_ongoing_requests}.")
        if not self.num_cpus_per_replica > 0:
            raise ValueError(f"--num-cpus-per-replica must be above 0, got {self.num_cpus_per_replica}.")
        if self.num_gpus_per_replica is not None and self.num_gpus_per_replica < 0:
            raise ValueError(f"--num-gpus-per-replica must be at least 0, got {self.num_gpus_per_replica}.")
        if self.max_ongoing_requests < 1:
            raise ValueError(f"--max-ongoing-requests must be at least 1, got {self.max_ongoing_requests}.")

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None


#: The options ``lmserve serve ray`` adds (one per :class:`RayOptions` field, by dest
#: name); a replica's engine is built without them.
RAY_OPTIONS = tuple(f.name for f in dataclasses.fields(RayOptions))


def replica_config(config: ServeConfig, cpu_threads: int) -> dict:
    """``config`` as a replica builds its own engine from it: a plain dict (it crosses
    processes) with the Ray options left out and the replica's CPU threads set."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    options = {name: value for name, value in config.options.items() if name not in RAY_OPTIONS}
    options["server"] = "api_server"
    options.setdefault("cpu_threads", None)
    if options["cpu_threads"] is None:
        options["cpu_threads"] = cpu_threads
    fields["options"] = options
    fields["plugins"] = list(config.plugins)
    return fields


def deploy(config: ServeConfig, ray: RayOptions):
    """Join (or start) the cluster, deploy the engine replicas, wait until they serve;
    return the deployment's handle and what the replicas report."""
    try:
        import ray as ray_api
        from lmserve.backends.ray.replica import EngineReplica
        from lmserve.backends.ray.router import SessionAffinityRouter
        from ray import serve
        from ray.serve.config import AutoscalingConfig, RequestRouterConfig
    except ImportError as exc:
        raise PluginError(f"`lmserve serve ray` needs Ray Serve: pip install 'lmserve[ray]' ({exc}).") from exc

    quiet = config.log_level not in ("DEBUG", "INFO")
    serve_log_level = "WARNING" if quiet else config.log_level
    logging.getLogger("ray.serve").setLevel(serve_log_level)  # this process's handles and routers
    if not ray_api.is_initialized():
        ray_api.init(address=ray.address, num_cpus=ray.ray_num_cpus if ray.address is None else None,
                     include_dashboard=False, logging_level=logging.WARNING if quiet else config.log_level,
                     log_to_driver=True)
    where = ray_api.get_runtime_context().gcs_address
    print(f"lmserve: Ray cluster at {where} ({'joined' if ray.address else 'started here'}); "
          f"resources: {ray_api.cluster_resources()}", file=sys.stderr)
    serve.start(proxy_location="Disabled", logging_config={"log_level": serve_log_level})

    tp = EngineConfig.from_options(config).tensor_parallel_size  # ranks per replica
    gpus = ray.num_gpus_per_replica
    if gpus is None:
        has_gpus = ray_api.cluster_resources().get("GPU", 0) > 0 and config.device != "cpu"
        gpus = tp if has_gpus else 0
    scaling = ({"autoscaling_config": AutoscalingConfig(
                    min_replicas=ray.min_replicas, max_replicas=ray.max_replicas,
                    initial_replicas=min(max(ray.num_replicas, ray.min_replicas), ray.max_replicas),
                    target_ongoing_requests=ray.target_ongoing_requests)}
               if ray.autoscaling else {"num_replicas": ray.num_replicas})
    deployment = serve.deployment(
        EngineReplica,
        name="engine",
        ray_actor_options={"num_cpus": ray.num_cpus_per_replica, "num_gpus": gpus},
        max_ongoing_requests=ray.max_ongoing_requests,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
        request_router_config=RequestRouterConfig(request_router_class=SessionAffinityRouter),
        logging_config={"log_level": serve_log_level, "enable_access_log": config.log_level == "DEBUG"},
        **scaling,
    )
    threads = max(1, int(ray.num_cpus_per_replica) // tp)  # per rank
    print(f"lmserve: deploying {_replica_count(ray)} on Ray (each: {ray.num_cpus_per_replica:g} CPU, "
          f"{gpus:g} GPU); their engines load now", file=sys.stderr)
    handle = serve.run(deployment.bind(replica_config(config, threads)), name=ray.app_name, route_prefix=None)
    info = handle.info.remote().result()
    return handle, info


def teardown(app_name: str) -> None:
    """Delete the deployment (on a joined cluster it would outlive this process otherwise)."""
    import ray as ray_api
    from ray import serve

    if ray_api.is_initialized():
        try:
            serve.delete(app_name)
        except Exception as exc:  # the cluster is going away too
            logger.warning("Could not delete the Ray Serve app %r: %s", app_name, exc)


def authenticate_with_token_if_any() -> None:
    """Ray clusters start with token authentication on; a client sends the token only
    in token mode. Where this machine has a token and no mode is chosen, choose token
    mode (a cluster without authentication accepts such a client too)."""
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"


def _replica_count(ray: RayOptions) -> str:
    if ray.autoscaling:
        return f"{ray.min_replicas}..{ray.max_replicas} replicas (autoscaling)"
    return f"{ray.num_replicas} replica{'s' * (ray.num_replicas != 1)}"
