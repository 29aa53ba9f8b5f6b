"""Duplex per-unit cost over long sessions on CPU (run by hand; prints a table, writes a PNG timeline).

    python bench/duplex.py                                  # tiny: 3600 units (1 h), mid-size: 300 units
    python bench/duplex.py --sizes tiny --units 600 --plot out/duplex_timeline.png

Every unit gets 1 s of noisy tone audio and, every `--frame-every` units, a frame. The model is forced to speak in
`--speak-every`-th units (listen bias) so text, speech codes and token2wav all run. Reported per model: median
per-stage latency, the cost ratio of unit 1000 (or the last) vs unit 10 (flat = about 1), and RSS against session
length; the plot shows every unit's stage times on the session timeline.
"""

import argparse
import os
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from minicpmo import MiniCPMOForConditionalGeneration, MiniCPMOProcessor, tiny_config
from minicpmo.audio_utils import INPUT_SAMPLE_RATE
from minicpmo.duplex import STAGES
from minicpmo.voices import load_voice


def rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def mid_config():
    return tiny_config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, head_dim=64,
                       tts_config={**tiny_config().tts_config.to_dict(), "llm_dim": 896})


def run(model, processor, n_units, frame_every, speak_every, voice):
    from PIL import Image

    session = model.duplex_session(processor, ref_audio=voice, force_listen_count=0, n_timesteps=5)
    rng = np.random.default_rng(0)
    frame = Image.fromarray(rng.integers(0, 255, (448, 448, 3), dtype=np.uint8))
    t = np.arange(INPUT_SAMPLE_RATE) / INPUT_SAMPLE_RATE
    rows = []
    for k in range(n_units):
        session.config.listen_bias = -1e9 if speak_every and k % speak_every == 0 else 1e9
        audio = (0.2 * np.sin(2 * np.pi * 220 * t) + 0.02 * rng.standard_normal(INPUT_SAMPLE_RATE)).astype(np.float32)
        start = time.perf_counter()
        out = session.step(audio, frame if frame_every and k % frame_every == 0 else None)
        total = time.perf_counter() - start
        rows.append(dict(unit=k, total=total, rss=rss_mb(), cache=session.state.llm.next_position,
                         speak=not out.is_listen, **out.timings))
    session.close()
    return rows


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(11, 3.2 * len(results)), squeeze=False)
    for ax, (name, rows) in zip(axes[:, 0], results.items()):
        units = [r["unit"] for r in rows]
        bottom = np.zeros(len(rows))
        for stage in STAGES:
            values = np.array([r[stage] * 1000 for r in rows])
            ax.bar(units, values, bottom=bottom, width=1.0, label=stage)
            bottom += values
        ax.set_title(f"{name}: per-unit latency by stage")
        ax.set_xlabel("unit (s of session)")
        ax.set_ylabel("ms")
        ax2 = ax.twinx()
        ax2.plot(units, [r["rss"] for r in rows], color="black", linewidth=1, label="RSS MB")
        ax2.set_ylabel("RSS MB")
        ax.legend(loc="upper left", fontsize=7, ncol=6)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    parser.add_argument("--units", type=int, default=None, help="units per session (default tiny 3600, mid 300)")
    parser.add_argument("--frame-every", type=int, default=1)
    parser.add_argument("--speak-every", type=int, default=5)
    parser.add_argument("--plot", default="bench/duplex_timeline.png")
    args = parser.parse_args()
    processor = MiniCPMOProcessor.from_defaults()
    voice = load_voice("en_dlc")
    results = {}
    for size in args.sizes:
        torch.manual_seed(0)
        model = MiniCPMOForConditionalGeneration(tiny_config() if size == "tiny" else mid_config()).eval()
        n_units = args.units or (3600 if size == "tiny" else 300)
        results[f"{size} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M)"] = run(
            model, processor, n_units, args.frame_every, args.speak_every, voice
        )
    print("| model | units | " + " | ".join(f"{s} ms" for s in STAGES) + " | total ms | unit 1000 / unit 10 "
          "| max cache | RSS MB at 10 / 100 / end |")
    print("|---" * (len(STAGES) + 6) + "|")
    for name, rows in results.items():
        medians = [statistics.median(r[s] * 1000 for r in rows) for s in STAGES]
        total = statistics.median(r["total"] * 1000 for r in rows)
        late = min(1000, len(rows) - 1)

        def window(center):
            picked = rows[max(0, center - 5) : center + 5]
            return statistics.median(r["total"] for r in picked)

        ratio = window(late) / window(10)
        rss = [rows[min(i, len(rows) - 1)]["rss"] for i in (10, 100, len(rows) - 1)]
        print(f"| {name} | {len(rows)} | " + " | ".join(f"{m:.1f}" for m in medians)
              + f" | {total:.1f} | {ratio:.2f} (unit {late}) | {max(r['cache'] for r in rows)} | "
              + " / ".join(f"{v:.0f}" for v in rss) + " |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {peak:.0f} MB; torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, fp32; "
          f"1 frame every {args.frame_every} unit(s), forced speaking every {args.speak_every} unit(s)")
    if args.plot:
        plot(results, args.plot)
        print(f"timeline plot: {os.path.abspath(args.plot)}")


if __name__ == "__main__":
    main()
