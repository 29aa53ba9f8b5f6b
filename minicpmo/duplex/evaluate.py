"""Duplex evaluation on a held-out synthetic set (other seeds, other user voices than training).

    python -m minicpmo.duplex.evaluate --model DIR [--n 50] [--seed 1] [--out eval_duplex] [--with-audio]

Generates `--n` held-out episodes (`minicpmo.synthetic.generate_episodes(split="heldout")`), replays each through a
duplex session one 1-s unit at a time (`minicpmo.duplex.replay.replay`; text only unless `--with-audio`), scores
the events against the episode ground truth (definitions in `minicpmo.duplex.metrics`), prints a table of metrics
vs targets, and writes OUT/report.json and OUT/timeline.png (one episode: user speech, model speech, listen/speak
per unit). The "oracle" column is a model that follows the ground truth at unit resolution: the best reachable
value with 1-s units (e.g. the turn-taking latency floor).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..errors import DuplexError
from ..processing.duplex_layout_minicpmo import DEFAULT_DUPLEX_SYSTEM_TEXT
from ..synthetic.episodes import EPISODE_TYPES, Episode
from .metrics import MetricSettings, aggregate, check_targets, episode_metrics, oracle_events
from .replay import OUTPUT_RATE, replay

DEFAULT_SEED = 1  # training sets use seed 0 by default; the held-out split also uses voices unseen in training
PLOT_PREFERENCE = ("interruption", "watch", "pause", "question", "chitchat")


class EvaluationError(DuplexError):
    """Bad evaluation input (no episodes, an episode index out of range, a non-Episode item)."""


def evaluate(model, processor, episodes: list[Episode], system_prompt: str = DEFAULT_DUPLEX_SYSTEM_TEXT,
             ref_audio=None, settings: MetricSettings | None = None, on_episode=None, asr_timing: bool = False,
             **controls) -> dict:
    """Replay every episode, score it, and aggregate. `controls` go to the duplex session (e.g.
    `generate_audio=False`, `force_listen_count`, `listen_bias`); `on_episode(episode, replay_result, metrics)` is
    called after each episode (the CLI keeps the plotted episode's audio that way). With `asr_timing` (speech
    generated), take-over and stop latencies are also read off the output audio's ASR word times (asr_timing.py).
    Returns a JSON-ready report."""
    if not episodes:
        raise EvaluationError("evaluate needs at least one episode")
    settings = settings or MetricSettings()
    per_episode, oracle = [], []
    started = time.perf_counter()
    compute_s = 0.0
    for episode in episodes:
        if not isinstance(episode, Episode):
            raise EvaluationError(f"episodes must be synthetic Episode objects, got {type(episode).__name__}")
        frames = [image for _, image in episode.frames]
        result = replay(model, processor, episode.user_audio, frames, system_prompt, ref_audio=ref_audio, **controls)
        metrics = episode_metrics(result.events, episode.ground_truth, settings)
        if asr_timing:
            from .asr_timing import episode_speech_timings, transcribe_words

            words = transcribe_words(result.output, OUTPUT_RATE)
            metrics["speech_timing"] = episode_speech_timings(words, episode.ground_truth, settings.takeover_window_s)
        compute_s += sum(sum(event.get("timings", {}).values()) for event in result.events)
        per_episode.append({"episode_id": episode.episode_id, "user_voice": episode.ground_truth["user_voice"],
                            **metrics, "events": result.events})
        oracle.append(episode_metrics(oracle_events(episode.ground_truth), episode.ground_truth, settings))
        if on_episode is not None:
            on_episode(episode, result, metrics)
    metrics = aggregate(per_episode)
    if asr_timing:
        from .asr_timing import aggregate_speech_timings

        metrics.update(aggregate_speech_timings([episode["speech_timing"] for episode in per_episode]))
    audio_s = sum(episode.duration_s for episode in episodes)
    return {
        "n_episodes": len(episodes),
        "episode_types": dict(Counter(episode.episode_type for episode in episodes)),
        "system_prompt": system_prompt,
        "controls": {key: value for key, value in controls.items() if isinstance(value, (bool, int, float, str))},
        "settings": asdict(settings),
        "metrics": metrics,
        "oracle_metrics": aggregate(oracle),
        "targets": check_targets(metrics),
        "timing": {"audio_s": audio_s, "wall_s": time.perf_counter() - started,
                   "real_time_factor": compute_s / audio_s if audio_s else None},
        "per_episode": per_episode,
    }


def _format_value(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_table(report: dict) -> str:
    """Metrics vs targets, with the oracle value and pass / FAIL / n/a."""
    oracle = report["oracle_metrics"]
    rows = [("metric", "value", "target", "oracle", "result")]
    for row in report["targets"]:
        status = {True: "pass", False: "FAIL", None: "n/a"}[row["passed"]]
        rows.append((row["label"], _format_value(row["value"]), f"{row['op']} {row['threshold']:g}",
                     _format_value(oracle.get(row["metric"])), status))
    metrics = report["metrics"]
    for key in ("asr_takeover_rate", "asr_takeover_latency_median_s", "asr_interruption_stop_median_s",
                "takeover_latency_mean_s", "interruption_stopped_rate", "interruption_speaking_rate",
                "proactive_delay_mean_s", "proactive_alert_correct", "must_listen_violations_per_minute"):
        rows.append((key, _format_value(metrics.get(key)), "", _format_value(oracle.get(key)), ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    counts = ", ".join(f"{kind} {count}" for kind, count in report["episode_types"].items())
    lines.append(f"{report['n_episodes']} episodes ({counts}); {report['timing']['audio_s']} s of audio")
    return "\n".join(lines)


def _label(text: str, limit: int) -> str:
    """Printable ASCII, at most `limit` characters (a random model's text would need many fonts)."""
    text = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in " ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 1] + "~"


def _envelope(audio: np.ndarray, rate: int, hop_s: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    hop = max(1, int(rate * hop_s))
    frames = audio[: audio.shape[0] // hop * hop].reshape(-1, hop)
    peak = np.abs(frames).max(axis=1) if frames.size else np.zeros(0)
    return np.arange(peak.shape[0]) * hop_s, peak


def plot_timeline(episode: Episode, events: list[dict], path: str | Path, output_audio: np.ndarray | None = None,
                  title: str | None = None) -> Path:
    """PNG of one episode: user speech (with ground-truth marks), model speech, listen/speak per unit.

    Model speech is drawn where it can be played: one unit after the unit that produced it (the metrics' timing
    convention, see `minicpmo.duplex.metrics`); the reference reply is drawn on the training timeline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth = episode.ground_truth
    unit_s = float(truth.get("unit_seconds", 1.0))
    duration = float(episode.duration_s)
    figure, (user_ax, model_ax, unit_ax) = plt.subplots(3, 1, figsize=(max(8.0, duration * 0.7), 6.5), sharex=True,
                                                       gridspec_kw={"height_ratios": [2, 1.5, 1.5]})
    times, peak = _envelope(episode.user_audio, episode.sample_rate)
    user_ax.fill_between(times, -peak, peak, color="tab:blue", linewidth=0)
    for start, end in truth.get("must_listen") or []:
        user_ax.axvspan(start, end, color="tab:gray", alpha=0.15, linewidth=0)
    for turn_end in truth.get("user_turn_end_s") or []:
        user_ax.axvline(turn_end, color="tab:green", linestyle="--", linewidth=1)
    if truth.get("pause"):
        user_ax.axvspan(truth["pause"]["start_s"], truth["pause"]["end_s"], color="tab:purple", alpha=0.25)
    for key, colour in (("interruption_s", "tab:red"), ("event_s", "tab:orange")):
        if truth.get(key) is not None:
            user_ax.axvline(truth[key], color=colour, linewidth=1.5)
    for segment in episode.user_segments:
        user_ax.text(segment.start_s, 0.95, _label(segment.text, 48), fontsize=7, va="top", clip_on=True,
                     transform=user_ax.get_xaxis_transform())
    user_ax.set_ylabel("user speech")
    user_ax.set_title(title or f"{episode.episode_id} ({episode.episode_type}): grey = must listen, green = turn end, "
                      "red = interruption, orange = event", fontsize=9)

    for turn in truth.get("assistant_turns") or []:
        model_ax.broken_barh([(turn["start_s"], turn["end_s"] - turn["start_s"])], (0.05, 0.2), facecolors="tab:green",
                             alpha=0.5)
        model_ax.text(turn["start_s"], 0.3, _label(turn["text"], 48), fontsize=7, clip_on=True)
    for event in events:  # a unit's speech plays one unit later: the decision is taken after hearing the unit
        if event["action"] == "speak":
            model_ax.broken_barh([(event["time_s"] + unit_s, unit_s)], (0.45, 0.2), facecolors="tab:orange",
                                 edgecolors="white")
    if output_audio is not None and np.any(output_audio):
        # replay already lays a unit's audio from the end of that unit, when it can be played
        times, peak = _envelope(np.asarray(output_audio, dtype=np.float32), OUTPUT_RATE)
        peak = 0.15 * peak / max(float(peak.max()), 1e-6)
        model_ax.fill_between(times, 0.8 - peak, 0.8 + peak, color="tab:red", linewidth=0)
    model_ax.set_ylim(0, 1)
    model_ax.set_yticks([0.15, 0.55, 0.8], ["reference", "model (played)", "model audio"], fontsize=7)
    model_ax.set_ylabel("assistant")

    for event in events:
        speaking = event["action"] == "speak"
        unit_ax.broken_barh([(event["time_s"], unit_s)], (0, 1), facecolors="tab:orange" if speaking else "0.85",
                            edgecolors="white")
        label = ("S " + _label(event.get("text") or "", 18)) if speaking else "L"
        unit_ax.text(event["time_s"] + unit_s / 2, 0.05, label, ha="center", va="bottom", rotation=90, fontsize=6,
                     clip_on=True)
    unit_ax.set_yticks([])
    unit_ax.set_ylabel("unit")
    unit_ax.set_xlabel("time (s)")
    unit_ax.set_xlim(0, duration + unit_s)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def pick_plot_episode(episodes: list[Episode], index: int | None = None) -> int:
    """The episode to plot: `index` if given, else the first of the most informative type."""
    if index is not None:
        if not 0 <= index < len(episodes):
            raise EvaluationError(f"--plot-episode {index} is out of range for {len(episodes)} episodes")
        return index
    for kind in PLOT_PREFERENCE:
        for position, episode in enumerate(episodes):
            if episode.episode_type == kind:
                return position
    return 0


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m minicpmo.duplex.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder (from_pretrained)")
    parser.add_argument("--n", type=int, default=50, help="number of held-out episodes")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="held-out set seed")
    parser.add_argument("--types", nargs="+", choices=EPISODE_TYPES, default=list(EPISODE_TYPES))
    parser.add_argument("--out", default="eval_duplex", help="output folder for report.json and timeline.png")
    parser.add_argument("--with-audio", action="store_true", help="also synthesise speech (slower)")
    parser.add_argument("--asr-timing", action="store_true",
                        help="with --with-audio: also time take-overs and stops from ASR word times ([eval] extra)")
    parser.add_argument("--voice", default="en_dlc", help="bundled voice name or reference audio (with --with-audio)")
    parser.add_argument("--system-prompt", default=DEFAULT_DUPLEX_SYSTEM_TEXT)
    parser.add_argument("--force-listen-count", type=int, default=1)
    parser.add_argument("--listen-bias", type=float, default=0.0)
    parser.add_argument("--takeover-window", type=float, default=MetricSettings.takeover_window_s)
    parser.add_argument("--proactive-tolerance", type=float, default=MetricSettings.proactive_tolerance_s)
    parser.add_argument("--plot-episode", type=int, default=None, help="index of the episode to plot")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be >= 1")
    if args.asr_timing and not args.with_audio:
        parser.error("--asr-timing needs --with-audio (it listens to the generated speech)")

    import torch

    from minicpmo import MiniCPMOForConditionalGeneration, MiniCPMOProcessor
    from minicpmo.synthetic import generate_episodes
    from minicpmo.voices import load_voice

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    load_kwargs = {"dtype": getattr(torch, args.dtype)} if args.dtype else {}
    model = MiniCPMOForConditionalGeneration.from_pretrained(args.model, **load_kwargs).to(device).eval()
    processor = MiniCPMOProcessor.from_pretrained(args.model)
    settings = MetricSettings(args.takeover_window, args.proactive_tolerance)
    episodes = generate_episodes(args.n, args.seed, split="heldout", types=tuple(args.types))
    plot_index = pick_plot_episode(episodes, args.plot_episode)
    kept = {}

    def keep_plotted(episode, result, metrics):
        if episode is episodes[plot_index]:
            kept["events"], kept["output"] = result.events, result.output

    ref_audio = load_voice(args.voice) if args.with_audio else None
    with torch.inference_mode():
        report = evaluate(model, processor, episodes, system_prompt=args.system_prompt, ref_audio=ref_audio,
                          settings=settings, on_episode=keep_plotted, generate_audio=args.with_audio,
                          asr_timing=args.asr_timing,
                          force_listen_count=args.force_listen_count, listen_bias=args.listen_bias)
    report.update(model=str(args.model), seed=args.seed, split="heldout", with_audio=args.with_audio)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plotted = episodes[plot_index]
    report["timeline"] = {"episode_id": plotted.episode_id, "path": "timeline.png"}
    plot_timeline(plotted, kept["events"], out / "timeline.png", kept["output"] if args.with_audio else None)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(format_table(report))
    print(f"wrote {out / 'report.json'} and {out / 'timeline.png'} ({plotted.episode_id})")
    return report


if __name__ == "__main__":
    main()
