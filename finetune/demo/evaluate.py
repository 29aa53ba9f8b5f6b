"""`python -m finetune.demo.evaluate --model DIR`: held-out perception accuracy and speech intelligibility of a demo
model, through `model.chat` as a user would ask.

Perception: `--n` fresh scenes per question kind (count_shape, shape_colour, count_colour, exists_shape), drawn
with a seed the training data never used; each question is asked typed and spoken (espeak-ng, the held-out
voices). A reply is right when it names the expected answer and no competing value (`answer_matches`, the rule
of the duplex evaluation). Chance is the best constant answer per kind (the most frequent expected answer).

Speech (needs the [eval] extra): the first `--speech-n` typed questions are answered with speech in the model's
voice; the 24 kHz output is transcribed by Whisper tiny.en (`minicpmo.asr_judge`) and scored by WER against the
text the model produced. The floor is the WER of the same texts spoken by the training voice (espeak-ng).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minicpmo.chat_prompts import system_message
from minicpmo.duplex.metrics import answer_matches
from minicpmo.errors import TrainingError
from minicpmo.synthetic.dataset import HELDOUT_VOICE_NAMES, USER_SPEEDS
from minicpmo.synthetic.scenes import QUESTION_KINDS, SHAPES, COLOURS, SceneQuestion, answer_question
from minicpmo.synthetic.scenes import random_scene, render

EVAL_SEED = 20261206  # no training stage draws from this seed


class DemoEvaluationError(TrainingError):
    """Bad evaluation arguments (n < 1, unknown modality)."""


@dataclass(frozen=True)
class PerceptionCase:
    kind: str
    question: SceneQuestion
    expected: str
    image: object
    voice: tuple[str, int]


def perception_cases(n_per_kind: int, seed: int = EVAL_SEED, image_size: int = 224) -> list[PerceptionCase]:
    """`n_per_kind` scenes per question kind, each with its question, expected short answer and a held-out voice."""
    if int(n_per_kind) < 1:
        raise DemoEvaluationError(f"n_per_kind must be >= 1, got {n_per_kind}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 99]))
    cases = []
    for kind in QUESTION_KINDS:
        made = 0
        while made < n_per_kind:
            state = random_scene(rng).state_at(0)
            if kind == "shape_colour":
                unique = [shape for shape in SHAPES if len(state.by_shape(shape)) == 1]
                question = SceneQuestion(kind, shape=str(rng.choice(unique)))
            elif kind == "count_colour":
                question = SceneQuestion(kind, colour=str(rng.choice(list(COLOURS))))
            else:
                question = SceneQuestion(kind, shape=str(rng.choice(SHAPES)))
            expected, _ = answer_question(state, question)
            voice = (str(rng.choice(HELDOUT_VOICE_NAMES)), int(rng.choice(USER_SPEEDS)))
            cases.append(PerceptionCase(kind, question, expected, render(state, image_size), voice))
            made += 1
    return cases


def chance_levels(cases: list[PerceptionCase]) -> dict[str, float]:
    """Per kind: the accuracy of always giving that kind's most frequent expected answer."""
    levels = {}
    for kind in QUESTION_KINDS:
        answers = Counter(case.expected for case in cases if case.kind == kind)
        if answers:
            levels[kind] = answers.most_common(1)[0][1] / sum(answers.values())
    return levels


def ask(model, processor, case: PerceptionCase, modality: str, generate_audio: bool = False, ref_audio=None):
    """The model's reply to one case, typed or spoken (and its 24 kHz speech with `generate_audio`)."""
    if modality == "typed":
        item = {"type": "text", "text": case.question.text()}
    elif modality == "spoken":
        from minicpmo.synthetic.speech import Voice, synthesize

        item = {"type": "audio", "audio": synthesize(case.question.text(), Voice(*case.voice)).audio}
    else:
        raise DemoEvaluationError(f"modality must be 'typed' or 'spoken', got {modality!r}")
    messages = [system_message(ref_audio if generate_audio else None),
                {"role": "user", "content": [{"type": "image", "image": case.image}, item]}]
    with torch.inference_mode():
        return model.chat(messages, processor=processor, generate_audio=generate_audio, max_new_tokens=24,
                          max_slice_nums=1)


def evaluate_perception(model, processor, cases: list[PerceptionCase], modalities=("typed", "spoken"),
                        log=print) -> dict:
    """Accuracy per modality and kind, with chance and a few example replies."""
    result = {"chance": chance_levels(cases), "n_per_kind": Counter(case.kind for case in cases)}
    for modality in modalities:
        right: dict[str, list[bool]] = {kind: [] for kind in QUESTION_KINDS}
        examples = []
        for case in cases:
            reply = ask(model, processor, case, modality)
            correct = answer_matches(reply, case.expected)
            right[case.kind].append(correct)
            if len(examples) < 8:
                examples.append({"question": case.question.text(), "expected": case.expected, "reply": reply})
        result[modality] = {kind: float(np.mean(flags)) for kind, flags in right.items() if flags}
        result[modality + "_examples"] = examples
        log(f"[{modality}] " + ", ".join(f"{kind} {value:.3f}" for kind, value in result[modality].items()))
    return result


def evaluate_speech(model, processor, cases: list[PerceptionCase], ref_audio, log=print) -> dict:
    """WER of spoken answers (Whisper tiny.en on the model's 24 kHz output vs its own text) and the espeak floor."""
    from minicpmo.asr_judge import transcribe, word_error_rate
    from minicpmo.audio_utils import INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE
    from minicpmo.synthetic.episodes import ASSISTANT_VOICE
    from minicpmo.synthetic.speech import synthesize

    rows = []
    for case in cases:
        text, audio = ask(model, processor, case, "typed", generate_audio=True, ref_audio=ref_audio)
        if not text.strip():
            continue
        heard = transcribe(audio, OUTPUT_SAMPLE_RATE).text if audio.size else ""
        floor_heard = transcribe(synthesize(text, ASSISTANT_VOICE).audio, INPUT_SAMPLE_RATE).text
        rows.append({"text": text, "heard": heard, "wer": word_error_rate(text, heard),
                     "floor_heard": floor_heard, "floor_wer": word_error_rate(text, floor_heard),
                     "seconds": audio.size / OUTPUT_SAMPLE_RATE})
    result = {"n": len(rows), "wer": float(np.mean([r["wer"] for r in rows])) if rows else None,
              "floor_wer": float(np.mean([r["floor_wer"] for r in rows])) if rows else None, "examples": rows[:10]}
    log(f"[speech] {len(rows)} answers: WER {result['wer']}, espeak floor {result['floor_wer']}")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m finetune.demo.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minicpmo/assets/demo_model")
    parser.add_argument("--n", type=int, default=200, help="scenes per question kind")
    parser.add_argument("--speech-n", type=int, default=40, help="answers spoken and transcribed (0: skip)")
    parser.add_argument("--modalities", default="typed,spoken")
    parser.add_argument("--out", default=None, help="write the report here (JSON)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.n < 1 or args.speech_n < 0:
        parser.error("--n must be >= 1 and --speech-n >= 0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from minicpmo import MiniCPMOForConditionalGeneration, MiniCPMOProcessor
    from minicpmo.voices import MODEL_VOICE_FILE, load_voice

    model = MiniCPMOForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
    processor = MiniCPMOProcessor.from_pretrained(args.model)
    cases = perception_cases(args.n)
    report = {"model": str(args.model), "perception": evaluate_perception(
        model, processor, cases, modalities=tuple(m for m in args.modalities.split(",") if m))}
    if args.speech_n:
        voice = load_voice(str(Path(args.model) / MODEL_VOICE_FILE))
        spread = cases[:: max(1, len(cases) // args.speech_n)][: args.speech_n]  # every kind, not just the first
        report["speech"] = evaluate_speech(model, processor, spread, voice)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str) + "\n")
    return report


if __name__ == "__main__":
    main()


__all__ = ["DemoEvaluationError", "PerceptionCase", "chance_levels", "evaluate_perception", "evaluate_speech",
           "perception_cases"]
