"""Seeded train / held-out sets of synthetic episodes, their conversion to `DuplexSample`, and an on-disk format.

Splits: episode i of (seed, split) draws everything from SeedSequence([seed, split code, i]), so the two splits
never share a random stream even for the same seed, and the held-out split speaks with user voices that never
occur in train. Episode types cycle through EPISODE_TYPES (n = 5 gives one of each).

On disk (`save_episodes`): DIR/episodes.jsonl with one JSON record per episode (metadata, scene timeline, timed
assistant tokens, ground truth) and DIR/<episode_id>/user.wav, assistant.wav (float32, 16 kHz) and
frames/<t>.png. CLI: `python -m minicpmo.synthetic.dataset --out DIR --n 50 --seed 0 --split train`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from dataclasses import asdict

import numpy as np
from PIL import Image

from minicpmo.errors import SyntheticDataError
from minicpmo.processing.duplex_layout_minicpmo import DEFAULT_DUPLEX_SYSTEM_TEXT
from minicpmo.processing.duplex_serializer_minicpmo import DuplexSample, TimedToken
from minicpmo.processing.tokenization_minicpmo import load_minicpmo_tokenizer

from .episodes import EPISODE_TYPES, AssistantTurn, Episode, EpisodeError, TimingConfig, UserSegment, generate_episode
from .scenes import SceneTimeline
from .speech import SAMPLE_RATE, Voice


TRAIN_VOICE_NAMES = ("en-us", "en-gb", "en-us+f3", "en-gb+f2", "en-us+m1", "en-gb-x-rp+m4")
HELDOUT_VOICE_NAMES = ("en-gb-scotland", "en-029+f4", "en-us-nyc+m6", "en-gb-x-gbclan+f5")
USER_SPEEDS = (140, 155, 170, 185, 200)
SPLITS = {"train": 0, "heldout": 1}
METADATA_FILE = "episodes.jsonl"


class DatasetError(SyntheticDataError):
    """Bad dataset arguments (unknown split, negative size) or an on-disk dataset that does not match its format."""


@functools.lru_cache(maxsize=1)
def default_tokenizer():
    """The real MiniCPM-o tokenizer shipped with the package (loaded once)."""
    return load_minicpmo_tokenizer()


def split_voices(split: str) -> tuple[str, ...]:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {tuple(SPLITS)}")
    return TRAIN_VOICE_NAMES if split == "train" else HELDOUT_VOICE_NAMES


def generate_episodes(
    n: int,
    seed: int,
    split: str = "train",
    tokenizer=None,
    types: tuple[str, ...] = EPISODE_TYPES,
    config: TimingConfig | None = None,
) -> list[Episode]:
    """`n` episodes of `split`, deterministic in (seed, split, index); types cycle through `types`."""
    voices = split_voices(split)
    if int(n) < 0:
        raise DatasetError(f"n must be >= 0, got {n}")
    if not types or any(kind not in EPISODE_TYPES for kind in types):
        raise EpisodeError(f"types must be a non-empty subset of {EPISODE_TYPES}, got {types}")
    tokenizer = tokenizer or default_tokenizer()
    episodes = []
    for index in range(int(n)):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), SPLITS[split], index]))
        voice = Voice(str(rng.choice(voices)), int(rng.choice(USER_SPEEDS)))
        episodes.append(
            generate_episode(rng, types[index % len(types)], tokenizer, voice, f"{split}-{seed}-{index:05d}", config)
        )
    return episodes


def episode_to_duplex_sample(
    episode: Episode,
    speech_codes=None,
    speech_codes_start_s: float = 0.0,
    system_prompt: str = DEFAULT_DUPLEX_SYSTEM_TEXT,
    ref_audio=None,
) -> DuplexSample:
    """The serializer's input for an episode. `speech_codes` are 25 Hz codes of `episode.assistant_audio`
    (code i covers [speech_codes_start_s + i/25, ...)); None trains text only."""
    if not isinstance(episode, Episode):
        raise DatasetError(f"episode must be an Episode, got {type(episode).__name__}")
    return DuplexSample(
        audio_16k=episode.user_audio,
        frames=list(episode.frames),
        assistant_tokens=episode.assistant_tokens,
        speech_codes=speech_codes,
        speech_codes_start_s=speech_codes_start_s,
        system_prompt=system_prompt,
        ref_audio=ref_audio,
        sampling_rate=episode.sample_rate,
    )


# ---------------------------------------------------------------- on-disk format


def _episode_record(episode: Episode, folder: str) -> dict:
    return {
        "episode_id": episode.episode_id,
        "episode_type": episode.episode_type,
        "duration_s": episode.duration_s,
        "sample_rate": episode.sample_rate,
        "user_voice": asdict(episode.user_voice),
        "user_audio": f"{folder}/user.wav",
        "assistant_audio": f"{folder}/assistant.wav",
        "frames": [[time_s, f"{folder}/frames/{int(time_s):04d}.png"] for time_s, _ in episode.frames],
        "scene": episode.scene.to_dict(),
        "user_segments": [asdict(segment) for segment in episode.user_segments],
        "assistant_turns": [
            {
                "text": turn.text,
                "kind": turn.kind,
                "start_s": turn.start_s,
                "end_s": turn.end_s,
                "interrupted": turn.interrupted,
                "tokens": [[t.token_id, t.start_s, t.end_s] for t in turn.tokens],
            }
            for turn in episode.assistant_turns
        ],
        "ground_truth": episode.ground_truth,
    }


def save_episodes(episodes: list[Episode], out_dir: str | os.PathLike) -> str:
    """Write episodes (wav + png files and one JSONL line each); returns the path of the JSONL file."""
    import soundfile

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, METADATA_FILE)
    with open(path, "w", encoding="utf-8") as handle:
        for episode in episodes:
            folder = episode.episode_id
            os.makedirs(os.path.join(out_dir, folder, "frames"), exist_ok=True)
            record = _episode_record(episode, folder)
            for key, audio in (("user_audio", episode.user_audio), ("assistant_audio", episode.assistant_audio)):
                soundfile.write(os.path.join(out_dir, record[key]), audio, SAMPLE_RATE, subtype="FLOAT")
            for (_, image), (_, frame_path) in zip(episode.frames, record["frames"]):
                image.save(os.path.join(out_dir, frame_path))
            handle.write(json.dumps(record) + "\n")
    return path


def _read_audio(path: str, duration_s: int) -> np.ndarray:
    import soundfile

    audio, rate = soundfile.read(path, dtype="float32")
    if rate != SAMPLE_RATE or audio.ndim != 1 or audio.shape[0] != duration_s * SAMPLE_RATE:
        raise DatasetError(f"{path} must be mono {SAMPLE_RATE} Hz audio of {duration_s} s")
    return audio


def load_episodes(out_dir: str | os.PathLike) -> list[Episode]:
    """Read a dataset written by `save_episodes` back into Episode objects."""
    out_dir = os.fspath(out_dir)
    path = os.path.join(out_dir, METADATA_FILE)
    if not os.path.isfile(path):
        raise DatasetError(f"{out_dir} holds no {METADATA_FILE}; it is not a synthetic episode dataset")
    episodes = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            try:
                record = json.loads(line)
                duration = int(record["duration_s"])
                frames = []
                for time_s, frame_path in record["frames"]:
                    with Image.open(os.path.join(out_dir, frame_path)) as image:
                        frames.append((float(time_s), image.convert("RGB")))
                turns = [
                    AssistantTurn(
                        turn["text"], turn["kind"], turn["start_s"], turn["end_s"],
                        [TimedToken(int(i), float(s), float(e)) for i, s, e in turn["tokens"]], turn["interrupted"],
                    )
                    for turn in record["assistant_turns"]
                ]
                episodes.append(
                    Episode(
                        episode_id=record["episode_id"],
                        episode_type=record["episode_type"],
                        duration_s=duration,
                        user_voice=Voice(**record["user_voice"]),
                        user_audio=_read_audio(os.path.join(out_dir, record["user_audio"]), duration),
                        assistant_audio=_read_audio(os.path.join(out_dir, record["assistant_audio"]), duration),
                        frames=frames,
                        scene=SceneTimeline.from_dict(record["scene"]),
                        user_segments=[UserSegment(**segment) for segment in record["user_segments"]],
                        assistant_turns=turns,
                        ground_truth=record["ground_truth"],
                        sample_rate=int(record["sample_rate"]),
                    )
                )
            except (KeyError, TypeError, json.JSONDecodeError) as error:
                raise DatasetError(f"{path}:{line_number} is not a valid episode record ({error!r})") from error
    return episodes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate synthetic omni-duplex episodes.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n", type=int, default=50, help="number of episodes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=tuple(SPLITS), default="train")
    parser.add_argument("--types", nargs="+", choices=EPISODE_TYPES, default=list(EPISODE_TYPES))
    parser.add_argument("--image-size", type=int, default=TimingConfig().image_size)
    args = parser.parse_args(argv)
    episodes = generate_episodes(args.n, args.seed, args.split, types=tuple(args.types),
                                 config=TimingConfig(image_size=args.image_size))
    path = save_episodes(episodes, args.out)
    seconds = sum(episode.duration_s for episode in episodes)
    print(f"wrote {len(episodes)} episodes ({seconds} s) to {path}")


if __name__ == "__main__":
    main()
