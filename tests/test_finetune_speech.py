"""Speech-output fine-tuning: teacher-forced speech loss == cached generation, speech collator, OmniSFTTrainer."""

import copy
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from finetune import build_collator, recipe_from_dict  # noqa: E402
from finetune.collators import dataset_loader  # noqa: E402
from finetune.labels import IGNORE_INDEX  # noqa: E402
from finetune.speech_targets import SpeechTargetError  # noqa: E402
from minicpmo.modeling.modeling_speech_decoder import (  # noqa: E402
    MiniCPMOSpeechDecoder,
    SpeechDecoderInputError,
    SpeechSegment,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "finetune" / "examples" / "data"
SPEECH_JSONL = DATA / "speech.jsonl"


@pytest.fixture(scope="module")
def processor():
    from minicpmo import MiniCPMOProcessor

    return MiniCPMOProcessor.from_defaults()


@pytest.fixture(scope="module")
def model():
    from minicpmo import MiniCPMOForConditionalGeneration, tiny_config

    torch.manual_seed(0)
    return MiniCPMOForConditionalGeneration(tiny_config())


@pytest.fixture(scope="module")
def decoder():
    from minicpmo import tiny_config

    torch.manual_seed(1)
    tts = MiniCPMOSpeechDecoder(tiny_config().tts_config).eval()
    tts.reset_code_heads()
    return tts


@pytest.fixture(scope="module")
def rows():
    return [json.loads(line) for line in SPEECH_JSONL.read_text().splitlines()]


def _embed_text(tts, token_id):
    return tts._text_token_embedding(token_id)


@torch.no_grad()
def _cached_turn_logits(tts, ids, hidden, codes):
    """Logits of the generation path: prefix fed at once, then every code fed back one by one."""
    state = tts.new_stream_state()
    prefix = torch.cat([tts.condition(ids[None], hidden[None]), _embed_text(tts, tts.config.text_eos_token_id),
                        _embed_text(tts, tts.config.audio_bos_token_id)], dim=1)
    logits = [tts._feed(prefix, state)]
    for code in codes:
        logits.append(tts._feed(tts.emb_code[0](code.view(1, 1)), state))
    return torch.stack(logits)


# ---- the decoder's training forward ---------------------------------------------------------------------------
def test_turn_based_teacher_forcing_equals_cached_generation_batched(decoder):
    torch.manual_seed(0)
    dim = decoder.config.llm_dim
    lengths, code_lengths = (5, 3), (7, 4)
    text_ids = torch.randint(0, 5000, (2, 5))
    hidden = torch.randn(2, 5, dim)
    text_mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2])
    codes = torch.full((2, 7), IGNORE_INDEX)
    codes[0] = torch.randint(0, 6561, (7,))
    codes[1, :4] = torch.randint(0, 6561, (4,))
    out = decoder.speech_loss(text_ids, hidden, codes, text_mask=text_mask)
    assert out.logits.shape == (2, 5 + 2 + 7, decoder.config.num_audio_tokens)
    for row in range(2):
        n, m = lengths[row], code_lengths[row]
        reference = _cached_turn_logits(decoder, text_ids[row, :n], hidden[row, :n], codes[row, :m])
        start = n + 1  # the audio_bos position
        torch.testing.assert_close(out.logits[row, start : start + m + 1], reference, rtol=1e-4, atol=1e-4)
        targets = out.labels[row, start : start + m + 1].tolist()
        assert targets == codes[row, :m].tolist() + [decoder.eos_code]  # codes then EOS
        assert (out.labels[row, :start] == IGNORE_INDEX).all() and (out.labels[row, start + m + 1 :] == IGNORE_INDEX).all()
    expected = torch.nn.functional.cross_entropy(out.logits[out.labels != IGNORE_INDEX], out.labels[out.labels != IGNORE_INDEX])
    torch.testing.assert_close(out.loss, expected)
    assert out.num_targets == 7 + 1 + 4 + 1


def test_duplex_teacher_forcing_equals_unit_by_unit_generation_and_grads_flow(decoder):
    torch.manual_seed(0)
    dim = decoder.config.llm_dim
    hidden = torch.randn(5, dim, requires_grad=True)
    ids = torch.randint(0, 5000, (5,))
    units = [
        SpeechSegment(ids[:2], hidden[:2], torch.randint(0, 6561, (25,)), end_with_eos=False),
        SpeechSegment(ids[2:2], hidden[2:2], torch.randint(0, 6561, (25,)), end_with_eos=False),  # empty unit
        SpeechSegment(ids[2:], hidden[2:], torch.randint(0, 6561, (9,)), end_with_eos=True),  # turn_eos unit
    ]
    decoder.zero_grad()
    out = decoder.duplex_speech_loss([units])
    # Generation: per unit [normalised cond, audio_bos] then its codes fed back, cache kept across the turn.
    state = decoder.new_stream_state()
    reference, bos = [], _embed_text(decoder, decoder.config.audio_bos_token_id)
    with torch.no_grad():
        for unit in units:
            cond = decoder.condition(unit.text_ids[None], unit.llm_hidden[None].detach(), normalize=True)
            reference.append(decoder._feed(torch.cat([cond, bos], dim=1), state))
            for code in unit.codes:
                reference.append(decoder._feed(decoder.emb_code[0](code.view(1, 1)), state))
    assert state.position == out.logits.shape[1] == 3 + 25 + 1 + 25 + 4 + 9
    fed = torch.stack(reference)
    positions = [2, *range(3, 28), 28, *range(29, 54), 57, *range(58, 67)]  # audio_bos and code positions
    torch.testing.assert_close(out.logits[0, positions], fed, rtol=1e-4, atol=1e-4)
    labels = out.labels[0]
    assert labels[2].item() == units[0].codes[0].item()
    assert labels[27].item() == IGNORE_INDEX  # the 25th code of a full unit predicts nothing (26th discarded)
    assert labels[-1].item() == decoder.eos_code  # EOS after the last code of the turn_eos unit
    assert labels[28].item() == units[1].codes[0].item()  # the empty unit's audio_bos predicts its first code
    out.loss.backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    assert decoder.projector_semantic.linear1.weight.grad.abs().sum() > 0
    assert decoder.head_code[0].parametrizations.weight.original1.grad.abs().sum() > 0


def test_speech_loss_rejects_bad_inputs(decoder):
    dim = decoder.config.llm_dim
    with pytest.raises(SpeechDecoderInputError, match="EOS is added by the loss"):
        decoder.speech_loss(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dim), torch.tensor([[6561]]))
    with pytest.raises(SpeechDecoderInputError, match="codes must be"):
        decoder.speech_loss(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dim), torch.tensor([1, 2]))
    with pytest.raises(SpeechDecoderInputError, match="at least one sequence"):
        decoder.duplex_speech_loss([])


# ---- collator ----------------------------------------------------------------------------------------------------
def test_speech_collator_shapes_labels_and_spoken_spans(processor, model, rows):
    tokenizer = processor.tokenizer
    collator = build_collator("speech", processor, media_root=DATA, max_slice_nums=1,
                              speech_tokenizer=model.token2wav.speech_tokenizer)
    loaded = list(dataset_loader("speech")(SPEECH_JSONL))  # datasets fills missing struct fields with None
    batch = collator(loaded)
    assert batch["input_ids"].shape == batch["labels"].shape
    assert batch["input_features"].shape[0] == 3  # 2 voice references + 1 user audio
    decoded = [tokenizer.decode(ids[labels != IGNORE_INDEX]) for ids, labels in zip(batch["input_ids"], batch["labels"])]
    assert decoded == ["Hello there!<|tts_eos|><|im_end|>", "A rising whistle.<|tts_eos|><|im_end|>"]
    assert batch["speech_row"].tolist() == [0, 1] and batch["speech_turn"].tolist() == [0, 1]
    assert batch["speech_eos"].all() and batch["speech_text_eos"].all()
    for unit, text in enumerate(["Hello there!", "A rising whistle."]):
        positions = batch["speech_positions"][unit][batch["speech_positions_mask"][unit]]
        assert tokenizer.decode(batch["input_ids"][unit, positions]) == text
        tts_bos = tokenizer.convert_tokens_to_ids("<|tts_bos|>")
        assert batch["input_ids"][unit, positions[0] - 1] == tts_bos
        assert batch["labels"][unit, positions[0] - 1] == IGNORE_INDEX
    codes = batch["speech_codes"]
    assert codes[0][codes[0] != IGNORE_INDEX].tolist() == rows[0]["messages"][2]["speech"]["codes"]
    assert (codes[1] != IGNORE_INDEX).sum() == 50  # 2 s of chirp -> 50 S3 codes from the speech tokenizer
    # The prompt up to <|tts_bos|> is exactly the generation prompt with use_tts_template=True.
    messages = collator.conversation(rows[0], 0)
    prompt = processor.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False,
                                           use_tts_template=True)
    full = processor.apply_chat_template(messages, tokenize=False)
    assert full.startswith(prompt) and full[len(prompt):].startswith("Hello there!<|tts_eos|>")


def test_speech_collator_errors(processor, rows):
    collator = build_collator("speech", processor, media_root=DATA)
    no_voice = copy.deepcopy(rows[0])
    no_voice["messages"] = no_voice["messages"][1:]
    with pytest.raises(SpeechTargetError, match="voice reference"):
        collator([no_voice])
    with pytest.raises(SpeechTargetError, match="needs a speech tokenizer"):
        collator([rows[1]])
    bad = copy.deepcopy(rows[0])
    bad["messages"][2]["speech"] = {"codes": [1, 99999]}
    with pytest.raises(SpeechTargetError, match="99999"):
        collator([bad])
    empty = copy.deepcopy(rows[0])
    empty["messages"][2]["speech"] = {"start": 0.0}
    with pytest.raises(SpeechTargetError, match="'audio' .* or 'codes'"):
        collator([empty])


# ---- OmniSFTTrainer: the speech loss falls, the LLM stays frozen, checkpoints resume ------------------------------
def _recipe(tmp_path, **sft):
    settings = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, learning_rate=1e-2,
        lr_scheduler_type="constant", gradient_checkpointing=False, logging_steps=1, save_strategy="no",
        disable_tqdm=True, seed=0, max_grad_norm=1.0,
    )
    settings.update(sft)
    return recipe_from_dict({
        "model": "unused-the-model-is-passed-in",
        "data": {"train": str(SPEECH_JSONL)},
        "collator": {"name": "speech", "max_slice_nums": 1},
        "preset": "speech_pretrain",
        "speech_loss_weight": 1.0,
        "sft": settings,
    })


def _logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def test_speech_pretrain_run_halves_the_speech_loss_and_resumes(tmp_path, processor, model):
    from finetune.sft import build_trainer
    from finetune.trainer import OmniSFTTrainer

    trained = copy.deepcopy(model)
    llm_before = trained.model.language_model.layers[0].mlp.up_proj.weight.detach().clone()
    trainer = build_trainer(_recipe(tmp_path, max_steps=12, learning_rate=3e-2, max_grad_norm=0.0), model=trained,
                            processor=processor)
    assert isinstance(trainer, OmniSFTTrainer)
    assert trainer.data_collator.speech_tokenizer is trained.token2wav.speech_tokenizer  # passed in when built
    trainer.train()
    speech = _logged(trainer, "speech_loss")
    assert len(speech) == 12 and speech[-1] <= speech[0] / 2, speech
    assert _logged(trainer, "text_loss")  # the text loss is still computed and logged
    torch.testing.assert_close(trained.model.language_model.layers[0].mlp.up_proj.weight, llm_before)  # frozen

    # Save every 2 steps, then resume from checkpoint-2 on a fresh copy: the same loss curve.
    full = build_trainer(_recipe(tmp_path, max_steps=4, save_strategy="steps", save_steps=2,
                                 output_dir=str(tmp_path / "full")), model=copy.deepcopy(model), processor=processor)
    full.train()
    assert (tmp_path / "full" / "checkpoint-2").is_dir()
    resumed = build_trainer(_recipe(tmp_path, max_steps=4, save_strategy="steps", save_steps=2,
                                    output_dir=str(tmp_path / "resumed")), model=copy.deepcopy(model),
                            processor=processor)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    assert _logged(resumed, "speech_loss")[-2:] == pytest.approx(_logged(full, "speech_loss")[2:], rel=1e-4)
    assert _logged(resumed, "loss")[-2:] == pytest.approx(_logged(full, "loss")[2:], rel=1e-4)


def test_trainer_leaves_its_collator_as_built(tmp_path, processor, model, rows):
    """OmniSFTTrainer never changes its collator: building the trainer and a training step rebind no attribute, and a
    speech collator built without a speech tokenizer keeps none (build_trainer gives the recipe's collator the
    model's when it builds it: test_speech_pretrain_run_halves_the_speech_loss_and_resumes)."""
    from finetune.sft import build_trainer, recipe_training_data

    recipe = _recipe(tmp_path, max_steps=1)
    dataset, collator = recipe_training_data(recipe, processor)  # no speech tokenizer passed in
    assert collator.speech_tokenizer is None
    before = dict(vars(collator))

    def unchanged():
        after = vars(collator)
        assert after.keys() == before.keys()
        assert [key for key in before if after[key] is not before[key]] == []

    coded = dataset.select([0])  # precomputed codes: trains without a speech tokenizer
    assert "codes" in rows[0]["messages"][2]["speech"]
    trainer = build_trainer(recipe, model=copy.deepcopy(model), processor=processor, train_dataset=coded,
                            data_collator=collator)
    assert trainer.data_collator is collator
    unchanged()
    trainer.train()
    assert trainer.state.global_step == 1
    unchanged()
    with pytest.raises(SpeechTargetError, match="needs a speech tokenizer"):  # audio targets still cannot be encoded
        collator([rows[1]])


def test_joint_sft_speech_gradients_reach_the_llm(processor, model, rows):
    """joint_sft: one compute_loss backward gives gradients to tts and, through projector_semantic, the LLM."""
    from finetune.presets import freeze_for_preset, get_preset
    from finetune.trainer import OmniSFTTrainer
    from finetune.sft import build_sft_config

    trained = copy.deepcopy(model)
    freeze_for_preset(trained, get_preset("joint_sft"))
    recipe = _recipe(Path("/tmp") / "unused", max_steps=1)
    collator = build_collator("speech", processor, media_root=DATA, max_slice_nums=1)
    trainer = OmniSFTTrainer(model=trained, args=build_sft_config(recipe), data_collator=collator,
                             train_dataset=dataset_loader("speech")(SPEECH_JSONL), processing_class=processor,
                             speech_loss_weight=1.0, text_loss_weight=0.0)
    batch = trainer._prepare_inputs(collator([rows[0]]))
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    assert trained.tts.projector_semantic.linear1.weight.grad.abs().sum() > 0
    # text weight 0: the LLM's last layer is reached only through the speech decoder's condition
    assert trained.model.language_model.layers[-1].mlp.down_proj.weight.grad.abs().sum() > 0
    assert trained.lm_head.weight.grad is None or trained.lm_head.weight.grad.abs().sum() == 0
