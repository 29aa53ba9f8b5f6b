"""The shipped demo model (minicpmo/assets/demo_model, trained by `python -m finetune.demo`): size, loading as the
Space's default, and its behaviour on held-out synthetic sessions (greedy decoding, so the results are fixed)."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from minicpmo.space.model_loading import DEMO_MODEL_DIR, load_default_model  # noqa: E402


@pytest.fixture(scope="module")
def loaded():
    return load_default_model()


def test_the_demo_checkpoint_is_shipped_and_small():
    files = sorted(DEMO_MODEL_DIR.rglob("*.safetensors"))
    assert [str(path.relative_to(DEMO_MODEL_DIR)) for path in files] == ["model.safetensors",
                                                                         "token2wav/model.safetensors"]
    assert sum(path.stat().st_size for path in files) <= 64 * 2**20
    for name in ("config.json", "processor_config.json", "voice.wav", "training_report.json"):
        assert (DEMO_MODEL_DIR / name).is_file(), name


def test_the_space_serves_the_demo_model_with_its_voice(loaded):
    from minicpmo.space.chat_handlers import MODEL_VOICE_CHOICE, resolve_voice, voice_choices
    from minicpmo.voices import load_voice

    assert loaded.name == str(DEMO_MODEL_DIR)
    assert Path(loaded.model_voice) == DEMO_MODEL_DIR / "voice.wav"
    assert voice_choices(loaded.model_voice)[0] == MODEL_VOICE_CHOICE
    np.testing.assert_array_equal(resolve_voice(MODEL_VOICE_CHOICE, None, loaded.model_voice),
                                  load_voice(loaded.model_voice))
    assert loaded.model.config.query_num == loaded.processor.image_processor.image_feature_size
    assert next(loaded.model.parameters()).dtype == torch.float32  # bf16 on disk, fp32 on CPU


def _replayed(loaded, episode_type: str, n: int = 4) -> list[dict]:
    from minicpmo.duplex.metrics import episode_metrics
    from minicpmo.duplex.replay import replay
    from minicpmo.processing.duplex_layout_minicpmo import DEFAULT_DUPLEX_SYSTEM_TEXT
    from minicpmo.synthetic import generate_episodes

    results = []
    for episode in generate_episodes(n, seed=1, split="heldout", types=(episode_type,)):
        with torch.inference_mode():
            result = replay(loaded.model, loaded.processor, episode.user_audio, [image for _, image in episode.frames],
                            DEFAULT_DUPLEX_SYSTEM_TEXT, generate_audio=False, force_listen_count=1)
        results.append(episode_metrics(result.events, episode.ground_truth))
    return results


def test_the_demo_model_takes_the_turn_after_a_question_and_not_in_a_pause(loaded):
    questions = _replayed(loaded, "question")
    assert all(metrics["must_listen_violations"] == 0 for metrics in questions)  # never talks over the question
    assert sum(metrics["turns"][0]["taken"] for metrics in questions) >= 3
    pauses = _replayed(loaded, "pause")
    assert sum(metrics["pause_taken_over"] for metrics in pauses) <= 1  # keeps listening through a mid-sentence pause
    assert sum(metrics["turns"][0]["taken"] for metrics in pauses) >= 3  # and answers once the question is complete


def test_the_demo_model_stops_when_interrupted(loaded):
    cut_in = [metrics["interruption"] for metrics in _replayed(loaded, "interruption", n=3)]
    talking = [event for event in cut_in if event["speaking_at_onset"]]
    assert talking and all(event["stopped"] and event["latency_s"] <= 2.0 for event in talking)


def test_the_demo_model_chats_about_a_scene_in_the_sentence_forms_it_was_taught(loaded):
    from minicpmo.chat_prompts import system_message
    from minicpmo.synthetic.scenes import SceneQuestion, random_scene, render

    image = render(random_scene(np.random.default_rng(5)).state_at(0), 224)
    forms = {SceneQuestion("exists_shape", shape="square"): ("yes, there is a square.", "no, there is no square."),
             SceneQuestion("count_shape", shape="circle"): ("circle",)}
    for question, expected in forms.items():
        messages = [system_message(None),
                    {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question.text()}]}]
        with torch.inference_mode():
            reply = "".join(chunk.text for chunk in loaded.model.chat(
                messages, processor=loaded.processor, stream=True, generate_audio=False, max_new_tokens=20))
        assert any(form in reply.lower() for form in expected), (question.text(), reply)
