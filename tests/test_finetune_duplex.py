"""Full-duplex fine-tuning: session rows -> Omni-Flow batches with speech targets; a tiny duplex run learns."""

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from finetune import build_collator, recipe_from_dict  # noqa: E402
from finetune.collators import dataset_loader  # noqa: E402
from finetune.duplex_data import DuplexFormatError, words_to_tokens  # noqa: E402
from finetune.labels import IGNORE_INDEX  # noqa: E402
from minicpmo.processing.duplex_serializer_minicpmo import DuplexSample, TimedToken, serialize_duplex  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "finetune" / "examples" / "data"
LISTEN, SPEAK, TURN_EOS, CHUNK_EOS = 151705, 151706, 151717, 151718
HELLO, THERE, OK_ID = 14990, 1052, 562


@pytest.fixture(scope="module")
def processor():
    from minicpmo import MiniCPMOProcessor

    return MiniCPMOProcessor.from_defaults()


@pytest.fixture(scope="module")
def model():
    from minicpmo import MiniCPMOForConditionalGeneration, tiny_config

    torch.manual_seed(0)
    return MiniCPMOForConditionalGeneration(tiny_config())


def _tone(path, seconds, freq):
    t = np.arange(int(seconds * 16000)) / 16000
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    """Three synthetic sessions: tones as the user, timed tokens and random 25 Hz codes as the assistant."""
    folder = tmp_path_factory.mktemp("duplex")
    rng = np.random.default_rng(0)
    rows = []
    for index, freq in enumerate((330.0, 440.0, 550.0)):
        _tone(folder / f"user_{index}.wav", 3.0, freq)
        tokens = [  # turn 1: "hello there" at 0.2-1.6 s; turn 2 (after a 1 s gap): "ok" at 2.6-2.9 s
            {"id": HELLO, "start": 0.2, "end": 0.6}, {"id": THERE, "start": 0.6, "end": 1.6},
            {"id": OK_ID, "start": 2.6, "end": 2.9},
        ]
        rows.append({
            "id": f"s{index}", "user_audio": f"user_{index}.wav", "assistant_tokens": tokens,
            "assistant_speech": {"codes": rng.integers(0, 6561, 68).tolist(), "start": 0.2},
        })
    path = folder / "sessions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_duplex_collator_batch_labels_and_speech_units(processor, sessions):
    rows = list(dataset_loader("duplex")(sessions))
    collator = build_collator("duplex", processor, media_root=sessions.parent)
    batch = collator(rows)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape == batch["attention_mask"].shape and ids.shape[0] == 3
    # one piece per session (3 units), cut as the live Whisper cache would be: features match streaming inference
    assert batch["input_features"].shape[:2] == (3, 80) and batch["input_features_mask"].sum(-1).tolist() == [301] * 3
    assert "pixel_values" not in batch  # no frames
    labelled = ids[labels != IGNORE_INDEX].tolist()
    assert set(labelled) <= {LISTEN, SPEAK, TURN_EOS, CHUNK_EOS, HELLO, THERE, OK_ID}
    assert processor.tokenizer.decode(ids[0][labels[0] != IGNORE_INDEX]) == (
        "<|speak|>hello there<|chunk_eos|><|speak|><|turn_eos|><|chunk_eos|><|speak|>ok<|turn_eos|><|chunk_eos|>"
    )
    # Speech units: per session a turn of two units (35 codes: 25 + 10) and a turn of one unit (8 codes);
    # every turn is its own speech-decoder sequence.
    assert batch["speech_row"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert batch["speech_turn"].tolist() == [0, 0, 1, 2, 2, 3, 4, 4, 5]
    assert not batch["speech_text_eos"].any()
    codes = batch["speech_codes"]
    per_unit = (codes != IGNORE_INDEX).sum(1).tolist()
    assert per_unit == [25, 10, 8] * 3
    # EOS only where generation may stop early: short units at a turn's start or end (not a full first unit)
    assert batch["speech_eos"].tolist() == [False, True, True] * 3
    reference = serialize_duplex(DuplexSample(
        audio_16k=np.zeros(48000, np.float32),  # the layout does not depend on the audio
        assistant_tokens=[TimedToken(t["id"], t["start"], t["end"]) for t in rows[0]["assistant_tokens"]],
        speech_codes=rows[0]["assistant_speech"]["codes"], speech_codes_start_s=0.2), processor.tokenizer)
    speaking = [unit for unit in reference.units if unit.speak]
    for position, unit in enumerate(speaking):
        assert codes[position][codes[position] != IGNORE_INDEX].tolist() == unit.speech_codes
        mask = batch["speech_positions_mask"][position]
        conditioned = ids[0, batch["speech_positions"][position][mask]].tolist()
        assert conditioned == unit.text_ids + ([TURN_EOS] if unit.end_of_turn else [])


def test_word_times_become_token_times(processor):
    tokens = words_to_tokens([{"word": "hello", "start": 0.0, "end": 0.4}, {"word": "there", "start": 0.4, "end": 0.6},
                              {"word": "ok", "start": 2.0, "end": 2.2}], processor.tokenizer, 1.0, "test")
    assert [t.token_id for t in tokens] == [HELLO, THERE, OK_ID]  # " there" gets its space; "ok" starts a turn
    assert tokens[1].start_s == 0.4 and tokens[1].end_s == 0.6
    with pytest.raises(DuplexFormatError, match="assistant_words\\[0\\]"):
        words_to_tokens([{"word": "x", "start": 0.0}], processor.tokenizer, 1.0, "test")


def test_example_duplex_file_and_bad_sessions(processor, model, tmp_path):
    collator = build_collator("duplex", processor, media_root=DATA, speech_tokenizer=model.token2wav.speech_tokenizer)
    batch = collator(list(dataset_loader("duplex")(DATA / "duplex.jsonl")))
    assert batch["pixel_values"].shape[0] == 2 and batch["speech_row"].tolist() == [0, 1]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": []}) + "\n")
    with pytest.raises(DuplexFormatError, match="user_audio"):
        dataset_loader("duplex")(tmp_path / "chat.jsonl")
    with pytest.raises(DuplexFormatError, match="needs 'user_audio'"):
        collator([{"id": "x", "assistant_tokens": []}])


def _control_loss(model, batch):
    """LM cross-entropy on the listen/speak/chunk_eos/turn_eos labels only."""
    inputs = {key: value for key, value in batch.items() if not key.startswith("speech_") and key != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    control = torch.isin(targets, torch.tensor([LISTEN, SPEAK, TURN_EOS, CHUNK_EOS]))
    return torch.nn.functional.cross_entropy(logits[control].float(), targets[control]).item()


def test_tiny_duplex_run_learns_control_tokens_and_speech(tmp_path, processor, model, sessions):
    from finetune.sft import build_trainer

    trained = copy.deepcopy(model)
    recipe = recipe_from_dict({
        "model": "unused-the-model-is-passed-in",
        "data": {"train": str(sessions)},
        "collator": {"name": "duplex"},
        "preset": "joint_sft",
        "speech_loss_weight": 0.5,
        "sft": dict(output_dir=str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=3,
                    learning_rate=1e-2, lr_scheduler_type="constant", gradient_checkpointing=False,
                    logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0),
    })
    trainer = build_trainer(recipe, model=trained, processor=processor)
    batch = trainer.data_collator(list(trainer.train_dataset))
    before = _control_loss(trained.eval(), batch)
    trainer.train()
    after = _control_loss(trained.eval(), batch)
    assert after < 0.75 * before, (before, after)  # the listen/speak/chunk_eos/turn_eos loss falls
    speech = [entry["speech_loss"] for entry in trainer.state.log_history if "speech_loss" in entry]
    assert len(speech) == 8 and speech[-1] < speech[0], speech
