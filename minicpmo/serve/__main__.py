"""`python -m minicpmo.serve --model DIR`: the realtime WebSocket server (ws://HOST:PORT/v1/realtime, GET /health).

`--ray --replicas N`: the same server as N Ray Serve replicas behind Ray's proxy on HOST:PORT (minicpmo.serve.ray_app).
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minicpmo.serve", description=__doc__)
    parser.add_argument("--model", default=None, help="a saved folder or hub id (default: the embedded demo model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-sessions", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=None,
                        help="most sessions per engine step (default: all with a unit ready; 1: one by one)")
    parser.add_argument("--ray", action="store_true", help="serve as Ray Serve replicas (the [ray] extra)")
    parser.add_argument("--replicas", type=int, default=1, help="with --ray: model replicas (one GPU each on GPUs)")
    parser.add_argument("--ray-address", default=None, help="with --ray: a running cluster (default: start one)")
    parser.add_argument("--gpus-per-replica", type=float, default=None,
                        help="with --ray: GPUs per replica (default 1 where CUDA is visible, else 0)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.ray:
        from . import ray_app

        application = ray_app.build_application(args.model, replicas=args.replicas,
                                                 gpus_per_replica=args.gpus_per_replica,
                                                 cpus_per_replica=args.cpus_per_replica,
                                                 max_sessions=args.max_sessions, max_batch=args.max_batch)
        ray_app.run(application, host=args.host, port=args.port, address=args.ray_address)
        return
    if args.replicas != 1:
        parser.error("--replicas needs --ray")

    import uvicorn

    from .realtime import RealtimeServer

    app = RealtimeServer.load(args.model, max_sessions=args.max_sessions, max_batch=args.max_batch).app()
    uvicorn.run(app, host=args.host, port=args.port, ws_max_size=8 * 1024 * 1024)


if __name__ == "__main__":
    main()
