"""Training data of the demo model, written in the finetune/ data formats so ordinary recipes train on it.

- Duplex sessions (`collator: duplex` rows): synthetic episodes saved with `minicpmo.synthetic.save_episodes`
  (user.wav, frames/*.png), plus one row each with the assistant's timed tokens and, when a speech tokenizer is
  given, the 25 Hz codes of the assistant track.
- Scene questions (`collator: speech` rows, turn-based chat): one rendered scene plus the question, spoken
  (espeak-ng, train voices) or typed, and the reply sentence, half of them with the reply's speech codes and the
  Space's voice-cloning system turn. Dense supervision for the encoders, the LLM and the chat speech path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from minicpmo.chat_prompts import system_message
from minicpmo.errors import SyntheticDataError
from minicpmo.synthetic.dataset import TRAIN_VOICE_NAMES, USER_SPEEDS, generate_episodes, save_episodes
from minicpmo.synthetic.episodes import ASSISTANT_VOICE, TimingConfig
from minicpmo.synthetic.scenes import answer_question, random_question, random_scene, render
from minicpmo.synthetic.speech import SAMPLE_RATE, Voice, synthesize

DUPLEX_FILE = "sessions.jsonl"
QA_FILE = "questions.jsonl"
VOICE_FILE = "voice.wav"


class DemoDataError(SyntheticDataError):
    """Bad arguments for the demo data writers (negative sizes, a speech tokenizer that yields no codes)."""


def write_duplex_sessions(n: int, seed: int, out_dir: str | os.PathLike, speech_tokenizer=None,
                          voice_audio: np.ndarray | None = None, voice_fraction: float = 0.5,
                          config: TimingConfig | None = None) -> Path:
    """Generate `n` train episodes into `out_dir` and write `sessions.jsonl` (duplex rows); returns its path.

    With `voice_audio` (16 kHz), a `voice_fraction` of the sessions carry it as the system prompt's voice
    reference, so the model works with and without one (the live demo sends one, text-only replay does not)."""
    if int(n) < 1 or not 0.0 <= voice_fraction <= 1.0:
        raise DemoDataError(f"need n >= 1 and 0 <= voice_fraction <= 1, got n={n}, voice_fraction={voice_fraction}")
    import soundfile

    out_dir = Path(out_dir)
    episodes = generate_episodes(int(n), int(seed), "train", config=config)
    save_episodes(episodes, out_dir)
    if voice_audio is not None:
        soundfile.write(out_dir / VOICE_FILE, np.asarray(voice_audio, dtype=np.float32), SAMPLE_RATE)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 11]))
    path = out_dir / DUPLEX_FILE
    with open(path, "w", encoding="utf-8") as handle:
        for episode in episodes:
            folder = episode.episode_id
            row = {
                "id": folder,
                "episode_type": episode.episode_type,
                "user_audio": f"{folder}/user.wav",
                "frames": [{"time": t, "image": f"{folder}/frames/{int(t):04d}.png"} for t, _ in episode.frames],
                "assistant_tokens": [
                    {"id": token.token_id, "start": token.start_s, "end": token.end_s}
                    for token in episode.assistant_tokens
                ],
            }
            if speech_tokenizer is not None:
                codes = speech_tokenizer.encode(episode.assistant_audio, SAMPLE_RATE).tolist()
                if not codes:
                    raise DemoDataError(f"the speech tokenizer gave no codes for {folder}")
                row["assistant_speech"] = {"codes": codes, "start": 0.0}
            if voice_audio is not None and rng.random() < voice_fraction:
                row["ref_audio"] = VOICE_FILE
            handle.write(json.dumps(row) + "\n")
    return path


def write_scene_questions(n: int, seed: int, out_dir: str | os.PathLike, spoken_fraction: float = 0.75,
                          speech_tokenizer=None, voice_audio: np.ndarray | None = None, speak_fraction: float = 0.5,
                          image_size: int = 224) -> Path:
    """`n` single-turn rows: a scene image and a question about it (spoken by a train voice with probability
    `spoken_fraction`, else typed) answered with the reply sentence the duplex episodes use.

    The system turn is the one the Space sends (`minicpmo.chat_prompts.system_message`). With `speech_tokenizer`
    and `voice_audio`, a `speak_fraction` of the rows get the voice-cloning system turn and the reply spoken in the
    assistant voice as speech-decoder target codes (`collator: speech` format); the others the text-only turn."""
    if int(n) < 1 or not 0.0 <= spoken_fraction <= 1.0 or not 0.0 <= speak_fraction <= 1.0:
        raise DemoDataError(f"need n >= 1 and fractions in [0, 1], got n={n}, spoken_fraction={spoken_fraction}, "
                            f"speak_fraction={speak_fraction}")
    import soundfile

    out_dir = Path(out_dir)
    media = out_dir / "questions"
    media.mkdir(parents=True, exist_ok=True)
    speaking = speech_tokenizer is not None and voice_audio is not None
    if speaking:
        soundfile.write(out_dir / VOICE_FILE, np.asarray(voice_audio, dtype=np.float32), SAMPLE_RATE)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7]))
    path = out_dir / QA_FILE
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(int(n)):
            state = random_scene(rng).state_at(0)
            question = random_question(rng, state)
            _, reply = answer_question(state, question)
            image_path = f"questions/{index:05d}.png"
            render(state, image_size).save(out_dir / image_path)
            content: list[dict] = [{"type": "image", "image": image_path}]
            if rng.random() < spoken_fraction:
                voice = Voice(str(rng.choice(TRAIN_VOICE_NAMES)), int(rng.choice(USER_SPEEDS)))
                audio_path = f"questions/{index:05d}.wav"
                soundfile.write(out_dir / audio_path, synthesize(question.text(), voice).audio, SAMPLE_RATE)
                content.append({"type": "audio", "audio": audio_path})
            else:
                content.append({"type": "text", "text": question.text()})
            answer: dict = {"role": "assistant", "content": reply}
            speak = speaking and rng.random() < speak_fraction
            if speak:
                spoken = synthesize(reply, ASSISTANT_VOICE).audio
                answer["speech"] = {"codes": speech_tokenizer.encode(spoken, SAMPLE_RATE).tolist()}
            system = system_message(VOICE_FILE if speak else None)
            row = {"messages": [system, {"role": "user", "content": content}, answer]}
            handle.write(json.dumps(row) + "\n")
    return path


__all__ = ["DUPLEX_FILE", "DemoDataError", "QA_FILE", "write_duplex_sessions", "write_scene_questions"]
