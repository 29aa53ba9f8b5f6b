"""Feed a recording through a duplex session in 1-s units (Full-Duplex-Bench style).

    python -m minicpmo.duplex.replay INPUT.wav|INPUT.mp4 --model DIR --out OUTDIR [--system-prompt TEXT]

Writes OUTDIR/events.jsonl (one line per unit: time, listen/speak, text, end_of_turn, timings) and
OUTDIR/output.wav: the model's speech at 24 kHz placed on the input's time axis (same duration as the input), so
the two can be overlaid to judge turn-taking.
"""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

from ..audio_utils import INPUT_SAMPLE_RATE as INPUT_RATE
from ..audio_utils import OUTPUT_SAMPLE_RATE as OUTPUT_RATE
from ..processing.duplex_layout_minicpmo import DEFAULT_DUPLEX_SYSTEM_TEXT
from ..processing.media_loading_minicpmo import FRAME_GRID_FPS, load_audio, read_video_file

VIDEO_SUFFIXES = {".mp4", ".mkv", ".mov", ".webm", ".avi"}
# Audio codecs pad a few ms; a tail shorter than this does not open one more unit.
UNIT_TAIL_TOLERANCE = 1600


def unit_count(num_samples: int) -> int:
    return max(1, int(np.ceil((num_samples - UNIT_TAIL_TOLERANCE) / INPUT_RATE)))


@dataclass
class ReplayResult:
    events: list[dict]
    output: np.ndarray  # 24 kHz, same duration as the input
    events_path: Path | None = None
    wav_path: Path | None = None


def read_recording(path: str | Path) -> tuple[np.ndarray, list]:
    """16 kHz mono audio and one frame (or None) per second."""
    path = Path(path)
    if path.suffix.lower() in VIDEO_SUFFIXES:
        frames, audio, fps = read_video_file(str(path))
        if audio is None:
            audio = np.zeros(int(len(frames) / fps * INPUT_RATE), dtype=np.float32)
        seconds = unit_count(audio.shape[0])
        step = int(round(fps or FRAME_GRID_FPS))
        unit_frames = [frames[min(k * step, len(frames) - 1)] for k in range(seconds)]
        return audio.astype(np.float32), unit_frames
    audio = load_audio(str(path))
    return audio, [None] * unit_count(audio.shape[0])


def replay(model, processor, audio: np.ndarray, frames: list, system_prompt: str, ref_audio=None,
           **controls) -> ReplayResult:
    """Run the session unit by unit; a unit's speech is laid down from the end of that unit (when it can play)."""
    n_units = len(frames)
    padded = np.zeros(n_units * INPUT_RATE, dtype=np.float32)
    kept = min(audio.shape[0], padded.shape[0])
    padded[:kept] = audio[:kept]
    output = np.zeros(int(round(audio.shape[0] / INPUT_RATE * OUTPUT_RATE)), dtype=np.float32)
    events = []
    session = model.duplex_session(processor, system_prompt=system_prompt, ref_audio=ref_audio, **controls)
    cursor = 0  # playback position in the output (speech queues up if it is produced faster than real time)
    try:
        for k in range(n_units):
            result = session.step(padded[k * INPUT_RATE : (k + 1) * INPUT_RATE], frames[k])
            # A unit's speech can only play once the unit's input has been heard: from its end on.
            start = int(round((result.time_s + 1.0) * OUTPUT_RATE))
            if result.interrupted:
                cursor = start  # barge-in: queued speech is dropped
            if result.audio is not None and result.audio.size:
                cursor = max(cursor, start)
                end = min(cursor + result.audio.shape[0], output.shape[0])
                if end > cursor:  # speech past the end of the recording is cut, as in real time
                    output[cursor:end] = result.audio[: end - cursor]
                cursor += result.audio.shape[0]
            events.append(result.as_event())
    finally:
        session.close()
    return ReplayResult(events=events, output=output)


def write_outputs(result: ReplayResult, out_dir: str | Path) -> ReplayResult:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result.events_path = out_dir / "events.jsonl"
    result.events_path.write_text("".join(json.dumps(event) + "\n" for event in result.events))
    result.wav_path = out_dir / "output.wav"
    soundfile.write(result.wav_path, result.output, OUTPUT_RATE)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minicpmo.duplex.replay", description=__doc__.splitlines()[0])
    parser.add_argument("input", help="a .wav (or any soundfile format) or a video file (.mp4 ...)")
    parser.add_argument("--model", required=True, help="model folder (e.g. written by python -m minicpmo.export)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--system-prompt", default=DEFAULT_DUPLEX_SYSTEM_TEXT)
    parser.add_argument("--voice", default="en_dlc", help="bundled voice name or reference audio path")
    parser.add_argument("--force-listen-count", type=int, default=3)
    parser.add_argument("--no-audio", action="store_true", help="text only (skip speech synthesis)")
    args = parser.parse_args(argv)

    from .. import MiniCPMOForConditionalGeneration, MiniCPMOProcessor
    from ..voices import load_voice

    model = MiniCPMOForConditionalGeneration.from_pretrained(args.model).eval()
    processor = MiniCPMOProcessor.from_pretrained(args.model)
    audio, frames = read_recording(args.input)
    result = replay(model, processor, audio, frames, args.system_prompt, ref_audio=load_voice(args.voice),
                    force_listen_count=args.force_listen_count, generate_audio=not args.no_audio)
    write_outputs(result, args.out)
    speaking = sum(event["action"] == "speak" for event in result.events)
    print(f"{len(result.events)} units ({speaking} speaking) -> {result.events_path}, {result.wav_path}")


if __name__ == "__main__":
    main()
