"""Scale-out on Ray Serve: `python -m minicpmo.serve --ray --replicas N` runs N copies of the realtime server.

Each replica is a Ray actor holding one model (one GPU each where there are GPUs: `gpus_per_replica`) and its own
`RealtimeServer`, so its sessions are stepped together on its engine exactly as on a single machine. Ray Serve's
HTTP proxy routes every new WebSocket connection to a replica (its default router prefers the replica with fewer
ongoing requests, and an open session is one), and the connection stays with that replica until it closes, so a
session is pinned to the model that holds its KV cache. `session.created` and `/health` name the replica.
Needs the [ray] extra.
"""

# No `from __future__ import annotations` here: Ray's class-based view re-creates the route functions, and FastAPI
# could not resolve a postponed "WebSocket" annotation there (it took the socket for a missing query parameter and
# closed every connection with 1008 / HTTP 403).
from fastapi import FastAPI, WebSocket
from ray import serve

from ..errors import DuplexError

APP_NAME = "minicpmo"
ingress = FastAPI(title="minicpmo realtime (Ray Serve)")


class RayServeError(DuplexError, ValueError):
    """Bad scale-out settings (replica count, resources per replica)."""


@serve.deployment(name="MiniCPMORealtime")
@serve.ingress(ingress)
class RealtimeReplica:
    """One model replica: loads `model` (a saved folder, a hub id, or None for the embedded demo model)."""

    def __init__(self, model=None, server_options=None):
        from .realtime import RealtimeServer

        self.server = RealtimeServer.load(model, replica=serve.get_replica_context().replica_id.unique_id,
                                          **(server_options or {}))

    @ingress.get("/health")
    def health(self) -> dict:
        return self.server.health()

    @ingress.websocket("/v1/realtime")
    async def realtime(self, websocket: WebSocket) -> None:
        await self.server.serve(websocket)


def build_application(model: str | None = None, replicas: int = 1, gpus_per_replica: float | None = None,
                      cpus_per_replica: float = 1.0, max_sessions: int = 16, max_batch: int | None = None):
    """The Serve application: `replicas` copies of `RealtimeReplica` (GPUs per replica: 1 where CUDA is visible,
    else 0), each taking at most `max_sessions` sessions."""
    import torch

    if int(replicas) < 1:
        raise RayServeError(f"replicas must be >= 1, got {replicas}")
    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if torch.cuda.is_available() else 0.0
    if gpus_per_replica < 0 or cpus_per_replica <= 0:
        raise RayServeError(f"need gpus_per_replica >= 0 and cpus_per_replica > 0, got {gpus_per_replica}, "
                            f"{cpus_per_replica}")
    deployment = RealtimeReplica.options(
        num_replicas=int(replicas), max_ongoing_requests=int(max_sessions) + 4,  # + health checks beside sessions
        ray_actor_options={"num_cpus": float(cpus_per_replica), "num_gpus": float(gpus_per_replica)})
    return deployment.bind(model, {"max_sessions": int(max_sessions), "max_batch": max_batch})


def run(application, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
        blocking: bool = True) -> None:
    """Start (or join, with `address`) a Ray cluster, put Serve's proxy on host:port and deploy `application`."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": int(port)})
    serve.run(application, name=APP_NAME, route_prefix="/", blocking=blocking)


__all__ = ["APP_NAME", "RayServeError", "RealtimeReplica", "build_application", "run"]
