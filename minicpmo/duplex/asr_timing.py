"""Duplex timings read off the model's output audio, as Full-Duplex-Bench does: an ASR judge's word times on the
time-aligned 24 kHz output (replay lays each unit's speech where it can be played), next to the token times.

- word starts are moved to the first loud frame inside the word (Whisper's own starts run early);
- take-over latency: for every answer window (user turn end T), the start of the first heard word in
  [T, T + window) minus T; a turn with no word there is not taken over;
- interruption stop latency: with the model heard talking across the user's onset O, the end of the last word
  that began before the user's next turn end (or O + window) minus O, at least 0.
Needs the [eval] extra (faster-whisper + Whisper tiny.en).
"""

from __future__ import annotations

import numpy as np

Word = tuple[str, float, float]


def takeover_from_words(words: list[Word], turn_end_s: float, window_s: float = 3.0) -> float | None:
    """Seconds from the turn end to the first word heard after it (None: no word within the window)."""
    starts = [start for _, start, _ in words if turn_end_s <= start < turn_end_s + window_s]
    return min(starts) - turn_end_s if starts else None


def stop_from_words(words: list[Word], onset_s: float, until_s: float) -> float | None:
    """Seconds from the user's onset until the model's speech stops (None: it was not heard talking at the onset,
    i.e. no word overlaps [onset - 0.5 s, onset])."""
    if not any(start <= onset_s and end >= onset_s - 0.5 for _, start, end in words):
        return None
    ends = [end for _, start, end in words if start < until_s and end > onset_s]
    return max(0.0, max(ends) - onset_s) if ends else 0.0


def episode_speech_timings(words: list[Word], ground_truth: dict, window_s: float = 3.0) -> dict:
    """The ASR-timed metrics of one episode (JSON-ready)."""
    result: dict = {"takeovers": []}
    for window in ground_truth.get("speak_windows") or []:
        if window["kind"] == "alert":
            continue
        turn_end = float(window["earliest_s"])
        result["takeovers"].append({"kind": window["kind"], "turn_end_s": turn_end,
                                    "latency_s": takeover_from_words(words, turn_end, window_s)})
    onset = ground_truth.get("interruption_s")
    if onset is not None:
        later_ends = [float(t) for t in ground_truth.get("user_turn_end_s") or [] if float(t) > float(onset)]
        until = min(later_ends) if later_ends else float(onset) + window_s
        result["interruption_stop_s"] = stop_from_words(words, float(onset), until)
    return result


def refine_word_starts(words: list[Word], audio: np.ndarray, sample_rate: int, hop_s: float = 0.01,
                       threshold: float = 0.1) -> list[Word]:
    """Whisper's word times start early (its first word often begins in the silence before it); move each start to
    the first 10-ms frame inside the word whose RMS reaches `threshold` x the loudest frame of the audio."""
    hop = max(1, int(hop_s * sample_rate))
    frames = np.asarray(audio, dtype=np.float32)[: len(audio) // hop * hop].reshape(-1, hop)
    if not len(frames):
        return list(words)
    rms = np.sqrt((frames**2).mean(axis=1))
    loud = rms >= threshold * max(float(rms.max()), 1e-9)
    refined = []
    for word, start, end in words:
        first, last = int(start / hop_s), max(int(start / hop_s) + 1, int(np.ceil(end / hop_s)))
        voiced = np.flatnonzero(loud[first:last])
        refined.append((word, start + float(voiced[0]) * hop_s if voiced.size else start, end))
    return refined


def transcribe_words(audio: np.ndarray, sample_rate: int) -> list[Word]:
    """The heard words of `audio` with (refined) start and end times in seconds."""
    from ..asr_judge import transcribe

    if not np.any(audio):
        return []
    return refine_word_starts(list(transcribe(audio, sample_rate).words), audio, sample_rate)


def aggregate_speech_timings(per_episode: list[dict]) -> dict:
    """Take-over rate and median latency, interruption stop median, over every episode's ASR timings."""
    latencies = [turn["latency_s"] for episode in per_episode for turn in episode["takeovers"]]
    heard = [value for value in latencies if value is not None]
    stops = [episode["interruption_stop_s"] for episode in per_episode
             if episode.get("interruption_stop_s") is not None]
    return {
        "asr_takeover_rate": len(heard) / len(latencies) if latencies else None,
        "asr_takeover_latency_median_s": float(np.median(heard)) if heard else None,
        "asr_interruption_stop_median_s": float(np.median(stops)) if stops else None,
        "asr_interruptions_heard": len(stops),
    }


__all__ = ["aggregate_speech_timings", "episode_speech_timings", "refine_word_starts", "stop_from_words",
           "takeover_from_words", "transcribe_words"]
