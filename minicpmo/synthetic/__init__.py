"""Synthetic omni-duplex sessions (espeak-ng speech + PIL scenes) with ground truth for training and evaluation.

Not part of the flattened Hub export: modules here may import `minicpmo` absolutely.
"""

import importlib

from .episodes import EPISODE_TYPES, Episode, TimingConfig, generate_episode
from .scenes import SceneQuestion, SceneTimeline, answer_question, render
from .speech import EspeakNotFoundError, Voice, espeak_available, synthesize

__all__ = [
    "EPISODE_TYPES",
    "HELDOUT_VOICE_NAMES",
    "TRAIN_VOICE_NAMES",
    "Episode",
    "EspeakNotFoundError",
    "SceneQuestion",
    "SceneTimeline",
    "TimingConfig",
    "Voice",
    "answer_question",
    "episode_to_duplex_sample",
    "espeak_available",
    "generate_episode",
    "generate_episodes",
    "load_episodes",
    "render",
    "save_episodes",
    "synthesize",
]

_DATASET_NAMES = frozenset(
    ("HELDOUT_VOICE_NAMES", "TRAIN_VOICE_NAMES", "episode_to_duplex_sample", "generate_episodes", "load_episodes",
     "save_episodes")
)


def __getattr__(name: str):
    """Dataset names load lazily so `python -m minicpmo.synthetic.dataset` runs without a double import."""
    if name in _DATASET_NAMES:
        return getattr(importlib.import_module(".dataset", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
