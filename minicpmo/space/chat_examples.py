"""The Chat tab's examples: scenes of the demo world with a question each, so a first visit gets an answer in one
click. The scene images are rendered by the world's own generator (seeded) into `assets/examples/`; the expected
answer of every example comes from the same ground truth the demo model was trained and evaluated on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minicpmo.synthetic.scenes import SceneQuestion, answer_question, random_scene, render

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "assets" / "examples"
EXAMPLE_SEED = 7
# (scene index, question): one of every question kind the demo model knows
_QUESTIONS = (
    (0, SceneQuestion("count_shape", shape="circle")),
    (1, SceneQuestion("shape_colour", shape="square")),
    (2, SceneQuestion("exists_shape", shape="triangle")),
    (3, SceneQuestion("count_colour", colour="red")),
    (4, SceneQuestion("count_shape", shape="triangle")),
    (5, SceneQuestion("shape_colour", shape="square")),
)


@dataclass(frozen=True)
class ChatExample:
    question: str
    image_path: Path
    expected_answer: str
    reply: str


def _scenes(count: int):
    rng = np.random.default_rng(EXAMPLE_SEED)
    return [random_scene(rng).state_at(0) for _ in range(count)]


def chat_examples(folder: Path = EXAMPLES_DIR) -> list[ChatExample]:
    """The examples, with their images in `folder` (rendered there when missing)."""
    states = _scenes(1 + max(index for index, _ in _QUESTIONS))
    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    for index, question in _QUESTIONS:
        path = folder / f"scene_{index}.png"
        if not path.is_file():
            render(states[index], 224).save(path)
        expected, reply = answer_question(states[index], question)
        examples.append(ChatExample(question.text(), path, expected, reply))
    return examples


__all__ = ["ChatExample", "EXAMPLES_DIR", "chat_examples"]
