"""espeak-ng training clips for the speech tokenizer and token2wav (issue 7, audio side).

The speech decoder only ever has to say what the synthetic assistant says, so the clips are mostly those
sentences in the assistant voice (``ASSISTANT_VOICE``), plus a share in the training user voices so the
tokenizer hears more than one speaker. Every clip carries its espeak phonemes (``espeak-ng -q -x``, stress
marks dropped): the tokenizer's CTC target. ``heldout_sentences`` are sentences never put into a training
clip (other number/colour/shape combinations and unrelated chit-chat lines), for the resynthesis metrics.
"""

from __future__ import annotations

import functools
import re
import subprocess
from dataclasses import dataclass

import numpy as np

from minicpmo.errors import DataFormatError
from minicpmo.synthetic.dataset import TRAIN_VOICE_NAMES, USER_SPEEDS
from minicpmo.synthetic.episodes import ACKNOWLEDGEMENTS, ASSISTANT_VOICE, CHITCHAT_LINES, WATCH_ACKNOWLEDGEMENTS
from minicpmo.synthetic.scenes import COLOURS, NUMBER_WORDS, SHAPES
from minicpmo.synthetic.speech import SAMPLE_RATE, Voice, espeak_path, synthesize

REFERENCE_TEXT = "Okay, I will keep an eye on it."  # the assistant voice reference; always a training sentence
EDGE_SILENCE_S = 0.12  # silence added before and after each clip: the flow learns what silence codes sound like


class SpeechClipError(DataFormatError):
    """A training clip is unusable: empty, not 1-D float audio, wrong sample rate, or bad phonemes."""


@dataclass(frozen=True)
class SpeechClip:
    """One utterance: ``audio`` float32 [N] at ``sample_rate`` (16 kHz), its text, voice and espeak phonemes."""

    text: str
    voice: str
    audio: np.ndarray
    phonemes: tuple[str, ...]
    sample_rate: int = SAMPLE_RATE

    @property
    def duration_s(self) -> float:
        return self.audio.shape[0] / self.sample_rate


def check_clips(clips, min_seconds: float = 0.3, sample_rate: int = SAMPLE_RATE) -> list[SpeechClip]:
    """Validate a clip list for training: raises SpeechClipError naming the first bad clip and why."""
    if isinstance(clips, SpeechClip) or not isinstance(clips, (list, tuple)) or not clips:
        raise SpeechClipError("clips must be a non-empty list of SpeechClip")
    for index, clip in enumerate(clips):
        if not isinstance(clip, SpeechClip):
            raise SpeechClipError(f"clip {index} is a {type(clip).__name__}, not a SpeechClip")
        if clip.sample_rate != sample_rate:
            raise SpeechClipError(
                f"clip {index} ({clip.text!r}) is sampled at {clip.sample_rate} Hz; training expects {sample_rate} Hz"
            )
        audio = clip.audio
        if not isinstance(audio, np.ndarray) or audio.ndim != 1 or not np.issubdtype(audio.dtype, np.floating):
            raise SpeechClipError(f"clip {index} ({clip.text!r}) audio must be a 1-D float numpy array")
        if audio.size == 0 or not np.abs(audio).max() > 0:
            raise SpeechClipError(f"clip {index} ({clip.text!r}) is empty or silent")
        if audio.size < min_seconds * sample_rate:
            raise SpeechClipError(
                f"clip {index} ({clip.text!r}) lasts {audio.size / sample_rate:.2f} s, need at least {min_seconds} s"
            )
        if not np.isfinite(audio).all():
            raise SpeechClipError(f"clip {index} ({clip.text!r}) holds NaN or inf samples")
        if not isinstance(clip.phonemes, tuple) or not all(isinstance(p, str) and p for p in clip.phonemes):
            raise SpeechClipError(f"clip {index} ({clip.text!r}) phonemes must be a tuple of non-empty strings")
    return list(clips)


# ---------------------------------------------------------------------------------------------- phonemes
@functools.lru_cache(maxsize=8192)
def word_phonemes(word: str, voice_name: str) -> tuple[str, ...]:
    """espeak-ng's phoneme mnemonics of one word in the voice's language, stress marks removed."""
    result = subprocess.run(
        [espeak_path(), "-q", "-x", "--sep= ", "-v", voice_name.split("+")[0], word],
        capture_output=True,
        check=False,
        text=True,
    )
    if result.returncode != 0:
        raise SpeechClipError(f"espeak-ng could not phonemise {word!r}: {result.stderr.strip()}")
    phones = [re.sub(r"[',%=]", "", p) for p in result.stdout.split()]
    return tuple(p for p in phones if p)


def text_phonemes(text: str, voice_name: str) -> tuple[str, ...]:
    """Phonemes of a sentence, word by word (the synthesiser also speaks word by word)."""
    phones: list[str] = []
    for match in re.finditer(r"\S+", text):
        spoken = re.sub(r"[^\w']", "", match.group(0)).lower()
        if spoken:
            phones.extend(word_phonemes(spoken, voice_name))
    return tuple(phones)


def make_clip(text: str, voice: Voice, edge_silence_s: float = EDGE_SILENCE_S) -> SpeechClip:
    """Synthesise ``text`` and pad it with a little silence on both sides."""
    audio = synthesize(text, voice).audio
    pad = np.zeros(int(round(edge_silence_s * SAMPLE_RATE)), np.float32)
    audio = np.concatenate([pad, audio, pad]).astype(np.float32)
    return SpeechClip(text=text, voice=voice.name, audio=audio, phonemes=text_phonemes(text, voice.name))


# ---------------------------------------------------------------------------------------------- sentences
def _plural(shape: str, count: int) -> str:
    return shape if count == 1 else shape + "s"


def all_assistant_sentences() -> list[str]:
    """Every sentence the synthetic assistant can say (answers, descriptions' pieces, acks, alerts)."""
    sentences = set(ACKNOWLEDGEMENTS) | set(WATCH_ACKNOWLEDGEMENTS)
    sentences.add("I do not see any shapes right now.")
    for shape in SHAPES:
        sentences.add(f"There are no {shape}s.")
        sentences.add(f"Yes, there is a {shape}.")
        sentences.add(f"No, there is no {shape}.")
        for count in range(1, 7):
            word = NUMBER_WORDS[count]
            sentences.add(f"There {'is' if count == 1 else 'are'} {word} {_plural(shape, count)}.")
        for colour in COLOURS:
            sentences.add(f"The {shape} is {colour}.")
            sentences.add(f"The {shape} is {colour} now.")
    for colour in COLOURS:
        sentences.add(f"I see no {colour} shapes.")
        for count in range(1, 7):
            sentences.add(f"I see {NUMBER_WORDS[count]} {colour} {_plural('shape', count)}.")
    return sorted(sentences)


def _description(rng: np.random.Generator) -> str:
    """A description like ``scenes.describe`` writes, over a random handful of groups."""
    groups = []
    for _ in range(int(rng.integers(1, 4))):
        count = int(rng.integers(1, 4))
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        groups.append(f"{NUMBER_WORDS[count] if count > 1 else 'one'} {colour} {_plural(shape, count)}")
    listed = groups[0] if len(groups) == 1 else ", ".join(groups[:-1]) + " and " + groups[-1]
    return f"Let me describe the picture. I can see {listed}."


def split_sentences(seed: int = 0, heldout_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """(train, heldout) assistant sentences; the split is fixed by ``seed``."""
    sentences = [s for s in all_assistant_sentences() if s != REFERENCE_TEXT]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sentences))
    n_heldout = max(1, int(round(heldout_fraction * len(sentences))))
    heldout = [sentences[i] for i in order[:n_heldout]]
    train = [sentences[i] for i in order[n_heldout:]] + [REFERENCE_TEXT]
    return train, heldout


def heldout_sentences(n: int = 12, seed: int = 0) -> list[str]:
    """``n`` sentences that no training clip says: held-out assistant combinations, then unrelated chit-chat."""
    _, heldout = split_sentences(seed)
    rng = np.random.default_rng(seed + 1)
    picked = [heldout[i] for i in rng.permutation(len(heldout))[: max(0, n - 3)]]
    return picked + list(CHITCHAT_LINES[: n - len(picked)])


def build_speech_corpus(
    n_clips: int = 400, seed: int = 0, assistant_fraction: float = 0.8, log=None
) -> list[SpeechClip]:
    """``n_clips`` training clips: mostly assistant sentences / descriptions in the assistant voice, the rest in
    the training user voices at the user speeds. Held-out sentences are never used."""
    if n_clips < 1 or not 0.0 <= assistant_fraction <= 1.0:
        raise SpeechClipError(
            f"need n_clips >= 1 and assistant_fraction in [0, 1], got {n_clips}, {assistant_fraction}"
        )
    train, heldout = split_sentences(seed)
    blocked = set(heldout) | set(CHITCHAT_LINES)
    rng = np.random.default_rng(seed)
    clips = []
    for index in range(n_clips):
        text = _description(rng) if rng.random() < 0.2 else str(rng.choice(train))
        if text in blocked:
            text = str(rng.choice(train))
        if rng.random() < assistant_fraction:
            voice = ASSISTANT_VOICE
        else:
            voice = Voice(str(rng.choice(TRAIN_VOICE_NAMES)), int(rng.choice(USER_SPEEDS)))
        clips.append(make_clip(text, voice))
        if log is not None and (index + 1) % 100 == 0:
            log(f"speech corpus: {index + 1}/{n_clips} clips")
    return clips


def assistant_reference_clip() -> SpeechClip:
    """The voice reference for token2wav: a fixed assistant sentence (a training sentence, ~2 s)."""
    return make_clip(REFERENCE_TEXT, ASSISTANT_VOICE)


__all__ = [
    "SpeechClip",
    "SpeechClipError",
    "all_assistant_sentences",
    "assistant_reference_clip",
    "build_speech_corpus",
    "check_clips",
    "heldout_sentences",
    "make_clip",
    "split_sentences",
    "text_phonemes",
    "word_phonemes",
]
