"""Load test of the realtime server on loopback: N WebSocket clients streaming real speech and frames in real time.

    python bench/serve_load.py                                   # tiny and mid configs, 1/2/4/8 clients, 30 units
    python bench/serve_load.py --configs tiny --clients 1 2 --units 10

For each config and client count the same streams run twice through `python -m minicpmo.serve`'s app (uvicorn on
a thread of this process, the Python client `minicpmo.serve.client` in one thread per client): once with the
batched engine (every session with a unit ready in one step) and once one by one (`max_batch=1`). Each client
sends its speech (espeak-ng, its own voice and sentence) in 0.25-s chunks paced to real time, a frame every other
unit, and never has more than `--window` units unanswered (the server buffers 5 s; a server slower than real time
therefore slows the clients down instead of refusing audio). Speech output is off (the engine batches the LLM and
the vision tower; speech codes and token2wav run per speaking session).

Per run: per-unit latency p50 / p95 (the unit's last audio chunk sent -> its `unit.decision` received), the
real-time factor (wall time / units per client), throughput (units per second, all clients), batched / one-by-one
throughput ratio, server RSS (this process), and the checks: every client's event ids count up without gaps, its
units arrive in order, and its transcript (per-unit decisions and text) equals its session stepped alone offline.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import torch

from duplex import rss_mb  # bench/duplex.py (`python bench/serve_load.py` puts bench/ on sys.path)
from serve import bench_model, session_streams  # bench/serve.py

from minicpmo.duplex.engine import DuplexEngine
from minicpmo.serve.client import RealtimeClient
from minicpmo.serve.local import running_server
from minicpmo.serve.realtime import create_app

CHUNK_S = 0.25


def controls(client_index: int) -> dict:
    """Half the clients lean to speaking, so units of a tick stop at different decode steps."""
    return {"force_listen_count": 0, "generate_audio": False, "max_speak_tokens_per_unit": 8,
            "listen_bias": -2.0 if client_index % 2 else 2.0}


def alone_transcript(model, processor, stream, client_index: int) -> list:
    """(action, text) per unit of the stream stepped by a session alone."""
    engine = DuplexEngine(model, processor)
    engine.open("alone", **controls(client_index))
    out = [engine.step({"alone": unit})["alone"] for unit in stream]
    engine.close("alone")
    return [(o.action, o.text) for o in out]


class LoadClient(threading.Thread):
    """One client: sends its stream in real time (bounded by `window` unanswered units), receives on its own."""

    def __init__(self, url: str, stream, client_index: int, window: int):
        super().__init__(daemon=True)
        self.url, self.stream, self.index, self.window = url, stream, client_index, window
        self.events, self.sent_at, self.decided_at = [], {}, {}
        self.error: BaseException | None = None
        self.stalls = 0

    def run(self) -> None:
        try:
            with RealtimeClient(self.url) as client:
                client.update_session(**controls(self.index))
                assert client.receive(timeout=60)["type"] == "session.updated"
                receiver = threading.Thread(target=self._receive, args=(client,), daemon=True)
                receiver.start()
                started = time.monotonic()
                for k, (audio, frame) in enumerate(self.stream):
                    while k - len(self.decided_at) >= self.window:
                        self.stalls += 1
                        time.sleep(0.05)
                    if frame is not None:
                        client.append_frame(frame)  # the client encodes PIL images as PNG
                    step = int(CHUNK_S * 16000)
                    for j, at in enumerate(range(0, len(audio), step)):
                        time.sleep(max(0.0, started + k + (j + 1) * CHUNK_S - time.monotonic()))
                        client.append_audio(audio[at:at + step])
                    self.sent_at[k] = time.monotonic()
                receiver.join(timeout=600)
        except BaseException as error:  # reported in the table, the other clients go on
            self.error = error

    def _receive(self, client) -> None:
        for event in client.events(timeout=600):  # until the server closes (the last unit's text follows its decision)
            self.events.append(event)
            if event["type"] == "unit.decision":
                self.decided_at[event["unit"]] = time.monotonic()
                if len(self.decided_at) == len(self.stream):
                    client.send({"type": "session.close"})

    def transcript(self) -> list:
        actions = {e["unit"]: e["action"] for e in self.events if e["type"] == "unit.decision"}
        texts: dict = {}
        for e in self.events:
            if e["type"] == "response.text.delta":
                texts[e["unit"]] = texts.get(e["unit"], "") + e["delta"]
        return [(actions.get(k), texts.get(k, "")) for k in range(len(self.stream))]

    def checks(self, expected: list) -> dict:
        ids = [e["event_id"] for e in self.events]
        units = [e["unit"] for e in self.events if e["type"] == "unit.decision"]
        return {"no_gaps": ids == list(range(ids[0], ids[0] + len(ids))) if ids else False,
                "in_order": units == list(range(len(self.stream))),
                "same_as_alone": self.transcript() == expected,
                "errors": [e for e in self.events if e["type"] == "error"]}


def run(model, processor, streams, expected, max_batch, window: int) -> dict:
    app = create_app(model, processor, max_sessions=len(streams) + 1, max_batch=max_batch)
    with running_server(app) as url:
        clients = [LoadClient(url, stream, i, window) for i, stream in enumerate(streams)]
        started = time.monotonic()
        for client in clients:
            client.start()
        for client in clients:
            client.join(timeout=3600)
        wall = time.monotonic() - started
    latencies = sorted(1000 * (c.decided_at[k] - c.sent_at[k]) for c in clients for k in c.decided_at
                       if k in c.sent_at)
    checks = [c.checks(expected[i]) for i, c in enumerate(clients)]
    units = sum(len(c.decided_at) for c in clients)
    return {"p50": statistics.median(latencies) if latencies else float("nan"),
            "p95": latencies[int(0.95 * (len(latencies) - 1))] if latencies else float("nan"),
            "rtf": wall / len(streams[0]), "units_per_s": units / wall, "rss": rss_mb(),
            "ok": all(c.error is None for c in clients) and all(
                ch["no_gaps"] and ch["in_order"] and ch["same_as_alone"] and not ch["errors"] for ch in checks),
            "failures": [(i, repr(c.error), checks[i]) for i, c in enumerate(clients)
                         if c.error is not None or not all(v for k, v in checks[i].items() if k != "errors")
                         or checks[i]["errors"]],
            "stalls": sum(c.stalls for c in clients)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--units", type=int, default=30)
    parser.add_argument("--window", type=int, default=4, help="most unanswered units per client")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.configs:
        model, processor = bench_model(name)
        for n in args.clients:
            streams = session_streams(n, args.units)
            expected = [alone_transcript(model, processor, stream, i) for i, stream in enumerate(streams)]
            results = {mode: run(model, processor, streams, expected, max_batch, args.window)
                       for mode, max_batch in (("one by one", 1), ("batched", None))}
            rows.append((name, n, results))
            for mode, result in results.items():
                print(f"{name} x{n} {mode}: p50 {result['p50']:.0f} ms, p95 {result['p95']:.0f} ms, "
                      f"{result['units_per_s']:.2f} u/s, RTF {result['rtf']:.2f}, checks {result['ok']}"
                      + (f", failures {result['failures']}" if result["failures"] else ""), flush=True)
        del model
    print(f"\nserve_load.py: {args.units} units per client in real time, window {args.window}, "
          f"{args.threads} threads, CPU, loopback WebSocket")
    print("| config | clients | latency p50 / p95 ms (one by one) | latency p50 / p95 ms (batched) | u/s one by one | "
          "u/s batched | ratio | RTF batched | events ok | RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, n, results in rows:
        alone, together = results["one by one"], results["batched"]
        print(f"| {name} | {n} | {alone['p50']:.0f} / {alone['p95']:.0f} | {together['p50']:.0f} / "
              f"{together['p95']:.0f} | {alone['units_per_s']:.2f} | {together['units_per_s']:.2f} | "
              f"{together['units_per_s'] / alone['units_per_s']:.2f}x | {together['rtf']:.2f} | "
              f"{alone['ok'] and together['ok']} | {together['rss']:.0f} |")


if __name__ == "__main__":
    main()
