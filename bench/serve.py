"""Throughput of the batched duplex engine against the same sessions stepped one by one, in one run.

    python bench/serve.py                         # tiny and mid configs, 1/2/4/8 sessions, 30 units each
    python bench/serve.py --configs mid --sessions 4 --units 30

Each session streams its own real speech (espeak-ng, a different voice and sentence per session) with a frame
every other unit; one unit in three is a speaking unit (listen bias -1e9, up to 8 tokens), the others listen
(+1e9), staggered over the sessions so rows of a batch stop at different decode steps (`--aligned`: all sessions
speak on the same units). Speech output is off: the engine batches the LLM and the
vision tower, and speech codes / token2wav run per speaking session. Both modes step the same sessions (fresh for
each mode) through one `DuplexEngine`: "batched" hands every session's unit to one `step`, "one by one" calls `step`
once per session. Prints per-tick latency p50/p95 (a tick = one unit of every session), units per second, the
real-time factor (tick time / 1 s), the ratio batched / one-by-one and the process RSS.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from duplex import mid_config, rss_mb  # bench/duplex.py (`python bench/serve.py` puts bench/ on sys.path)

from minicpmo import MiniCPMOForConditionalGeneration, MiniCPMOProcessor, tiny_config
from minicpmo.duplex.engine import DuplexEngine

SENTENCES = ["What colour is the triangle in the middle?", "How many squares can you see right now?",
             "Tell me when the circle turns red, please.", "Is there a green shape anywhere in the picture?"]


def session_streams(n_sessions: int, n_units: int):
    """Per session: a list of (1 s of 16 kHz speech, frame or None)."""
    from PIL import Image

    from minicpmo.synthetic.dataset import TRAIN_VOICE_NAMES
    from minicpmo.synthetic.speech import Voice, synthesize

    streams = []
    for s in range(n_sessions):
        voice = Voice(TRAIN_VOICE_NAMES[s % len(TRAIN_VOICE_NAMES)], 150 + 10 * s)
        speech = synthesize(SENTENCES[s % len(SENTENCES)], voice).audio.astype(np.float32)
        total = np.tile(speech, int(np.ceil(n_units * 16000 / len(speech))) + 1)[: n_units * 16000]
        rng = np.random.default_rng(s)
        units = []
        for k in range(n_units):
            frame = (Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)) if k % 2 == 0 else None)
            units.append((total[k * 16000:(k + 1) * 16000], frame))
        streams.append(units)
    return streams


def bench_model(name: str):
    """The random model of a config name ("tiny" or "mid"), seed 0, and its processor."""
    torch.manual_seed(0)
    model = MiniCPMOForConditionalGeneration(tiny_config() if name == "tiny" else mid_config()).eval()
    return model, MiniCPMOProcessor.from_defaults()


def run(model, processor, streams, batched: bool, aligned: bool = False) -> dict:
    engine = DuplexEngine(model, processor)
    ids = [f"s{i}" for i in range(len(streams))]
    for sid in ids:
        engine.open(sid, force_listen_count=0, generate_audio=False, max_speak_tokens_per_unit=8)
    ticks, decisions = [], {sid: [] for sid in ids}
    for k in range(len(streams[0])):
        for i, sid in enumerate(ids):
            speaks = k % 3 == 0 if aligned else (k + i) % 3 == 0
            engine.sessions[sid].config.listen_bias = -1e9 if speaks else 1e9
        units = {sid: streams[i][k] for i, sid in enumerate(ids)}
        started = time.perf_counter()
        if batched:
            outs = engine.step(units)
        else:
            outs = {}
            for sid, unit in units.items():
                outs.update(engine.step({sid: unit}))
        ticks.append(time.perf_counter() - started)
        for sid, out in outs.items():
            decisions[sid].append(out.token_ids)
    ticks_ms = sorted(1000 * t for t in ticks)
    return {"p50": statistics.median(ticks_ms), "p95": ticks_ms[int(0.95 * (len(ticks_ms) - 1))],
            "units_per_s": len(ids) * len(ticks) / sum(ticks), "rtf": statistics.median(ticks),
            "decisions": decisions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    parser.add_argument("--sessions", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--units", type=int, default=30)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--aligned", action="store_true",
                        help="every session speaks on the same units (decode steps batch fully) instead of staggered")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.configs:
        model, processor = bench_model(name)
        for n in args.sessions:
            streams = session_streams(n, args.units)
            alone = run(model, processor, streams, batched=False, aligned=args.aligned)
            together = run(model, processor, streams, batched=True, aligned=args.aligned)
            same = alone["decisions"] == together["decisions"]
            rows.append((name, n, alone, together, same, rss_mb()))
            print(f"{name} x{n}: one-by-one {alone['units_per_s']:.2f} u/s, batched {together['units_per_s']:.2f} u/s, "
                  f"ratio {together['units_per_s'] / alone['units_per_s']:.2f}, same tokens {same}", flush=True)
        del model
    print(f"\n{Path(__file__).name}: {args.units} units per session, {args.threads} threads, CPU")
    print("| config | sessions | tick p50 / p95 ms (one by one) | tick p50 / p95 ms (batched) | units/s one by one | "
          "units/s batched | ratio | RTF batched | same tokens | RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, n, alone, together, same, rss in rows:
        print(f"| {name} | {n} | {alone['p50']:.0f} / {alone['p95']:.0f} | {together['p50']:.0f} / "
              f"{together['p95']:.0f} | {alone['units_per_s']:.2f} | {together['units_per_s']:.2f} | "
              f"{together['units_per_s'] / alone['units_per_s']:.2f}x | {together['rtf']:.2f} | {same} | {rss:.0f} |")


if __name__ == "__main__":
    main()
