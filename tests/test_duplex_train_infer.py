"""Duplex training audio == duplex inference audio: the serializer's encoder inputs give every unit's audio slots the
embeddings the live loop (streaming mel -> `encode_unit` with its Whisper cache and 30-s reset) feeds the LLM.

The one known seam: live, the first unit after a cache reset convolves with its 2 left-redundancy mel frames; the
offline encoder starts each piece with zero conv padding. Its effect is pinned down exactly by a streaming reference
that drops the conv's left context at resets, and bounded against the real live session.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import functools  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from minicpmo.modeling.modeling_duplex_audio import (  # noqa: E402
    DuplexAudioEncoderState,
    encode_unit,
    needs_cache_reset,
)
from minicpmo.processing.duplex_serializer_minicpmo import (  # noqa: E402
    DuplexSample,
    DuplexSampleError,
    serialize_duplex,
    streaming_audio_pieces,
)
from minicpmo.processing.feature_extraction_minicpmo import frames_to_token_count  # noqa: E402
from minicpmo.processing.streaming_mel_minicpmo import StreamingMelProcessor  # noqa: E402

SR = 16000
SMALL_POSITIONS = 160  # cache 150 + next unit's 52 pre-crop frames >= 160: the cache resets every 3 units
SYSTEM = "Streaming Omni Conversation."


@functools.lru_cache(maxsize=None)
def processor():
    from minicpmo import MiniCPMOProcessor

    return MiniCPMOProcessor.from_defaults()


@functools.lru_cache(maxsize=None)
def small_cache_model():
    from minicpmo import MiniCPMOForConditionalGeneration, tiny_config

    config = tiny_config()
    config.audio_config.max_source_positions = SMALL_POSITIONS
    torch.manual_seed(0)
    return MiniCPMOForConditionalGeneration(config).eval()


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    """White noise: its log-mel lies far above both mel floors, so no floor is active."""
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def listen_session(audio, ref_audio=None):
    return serialize_duplex(DuplexSample(audio_16k=audio, ref_audio=ref_audio, system_prompt=SYSTEM),
                            processor().tokenizer)


def training_unit_embeddings(model, serialized):
    """Audio embeddings the training forward pours into each unit's 10 slots: [units, 10, hidden]."""
    inputs = serialized.model_inputs(processor(), max_source_positions=model.config.audio_config.max_source_positions)
    with torch.no_grad():
        embeds = model.model.embed_multimodal(
            inputs["input_ids"], input_features=inputs["input_features"],
            input_features_mask=inputs["input_features_mask"],
        )[0]
    return embeds, torch.stack([embeds[unit.decision_pos - 10 : unit.decision_pos] for unit in serialized.units])


def streaming_reference(model, audio, units, drop_left_context_at_reset):
    """Live front end + `encode_unit` unit by unit; optionally restart the conv (not just the cache) at resets."""
    core, mel = model.model, StreamingMelProcessor()
    mel_state, state, outputs = None, DuplexAudioEncoderState(), []
    with torch.no_grad():
        for k in range(units):
            chunk, mel_state = mel.step(audio[k * SR : (k + 1) * SR], mel_state)
            if drop_left_context_at_reset and needs_cache_reset(
                state.encoder_state.cached_frames, chunk.shape[-1], core.apm.max_source_positions
            ):
                state, chunk = DuplexAudioEncoderState(), chunk[..., 2:]  # a fresh stream: zero conv padding
            embeddings, state = encode_unit(core.apm, core.audio_projection_layer, chunk, state)
            outputs.append(embeddings)
    return torch.stack(outputs)


# ---- pieces ---------------------------------------------------------------------------------------------------
def test_pieces_follow_the_official_30_s_cache_reset():
    """1500 positions (the default, from the extractor's 30 s): 29 units per piece, 100 frames each + 1 of right
    context, exactly 10 tokens per unit; the frames are the live streaming mel's."""
    audio = noise(60.0, seed=1)
    serialized = listen_session(audio)
    inputs = serialized.model_inputs(processor())
    lengths = inputs["input_features_mask"].sum(-1).tolist()
    assert lengths == [2901, 2901, 201]
    assert [frames_to_token_count(n) for n in lengths] == [290, 290, 20]
    assert int(serialized.audio_slot_mask.sum()) == 600
    mel, state = StreamingMelProcessor(), None
    chunks = []
    for k in range(60):
        chunk, state = mel.step(audio[k * SR : (k + 1) * SR], state)
        chunks.append(chunk[0])
    features = inputs["input_features"]
    torch.testing.assert_close(features[0, :, :100], chunks[0][:, :100], rtol=0, atol=0)
    torch.testing.assert_close(features[1, :, :100], chunks[29][:, 2:102], rtol=0, atol=0)  # after the reset
    torch.testing.assert_close(features[0, :, 2900], chunks[28][:, 102], rtol=0, atol=0)  # right redundancy frame
    torch.testing.assert_close(features[2, :, 200], chunks[59][:, 102], rtol=0, atol=0)


def test_sub_second_units_and_bad_settings():
    audio = noise(1.5, seed=2)
    half = serialize_duplex(DuplexSample(audio_16k=audio), processor().tokenizer, unit_seconds=0.5,
                            codes_per_unit=12)
    inputs = half.model_inputs(processor())
    assert inputs["input_features_mask"].sum(-1).tolist() == [150]  # partial last chunk: real frames, no context
    assert frames_to_token_count(150) == int(half.audio_slot_mask.sum()) == 15
    quarter = serialize_duplex(DuplexSample(audio_16k=noise(1.0)), processor().tokenizer, unit_seconds=0.25,
                               codes_per_unit=6)
    with pytest.raises(DuplexSampleError, match="multiple of 0.1 s"):
        quarter.model_inputs(processor())
    with pytest.raises(DuplexSampleError, match="max_source_positions"):
        half.model_inputs(processor(), max_source_positions=40)
    with pytest.raises(DuplexSampleError, match="max_source_positions"):
        half.model_inputs(processor(), max_source_positions=1.5)
    pieces = streaming_audio_pieces(audio, StreamingMelProcessor(), 1500)
    torch.testing.assert_close(pieces[0], inputs["input_features"][0], rtol=0, atol=0)


# ---- training == inference --------------------------------------------------------------------------------------
def test_training_audio_embeddings_equal_the_live_duplex_session():
    """7 units with a cache of 3 units: pieces [0-2], [3-5], [6]. The live session (all listen units) builds the same
    token sequence, and its recorded unit prefills carry the same audio embeddings as the training forward:
    - to float precision (atol 1e-6 on values of ~0.04) wherever no reset seam is involved, reference audio included;
    - on the first unit after each reset, within 1% of the embedding scale (the conv left-context seam; measured
      about 0.25% with this random model), and exactly equal to a stream that restarts its conv at resets."""
    model = small_cache_model()
    audio, ref_audio = noise(7.0, seed=3), noise(1.5, seed=4)
    serialized = listen_session(audio, ref_audio)
    inputs = serialized.model_inputs(processor(), max_source_positions=SMALL_POSITIONS)
    assert inputs["input_features_mask"].sum(-1).tolist() == [150, 301, 301, 101]  # reference first, then units
    embeds, train = training_unit_embeddings(model, serialized)

    session = model.duplex_session(processor(), system_prompt=SYSTEM, ref_audio=ref_audio, generate_audio=False,
                                   force_listen_count=10**6, record=True)
    for k in range(7):
        assert session.step(audio[k * SR : (k + 1) * SR]).is_listen
    state = session.state.llm
    assert session.state.audio_state.cache_resets == 2
    assert state.sequence_ids == serialized.input_ids.tolist()
    # fed: system prefix, then per unit its prefill (<unit> + 10 slots) and its closing [<|listen|>, </unit>]
    assert len(state.fed_embeds) == 1 + 2 * 7
    system = state.fed_embeds[0]
    torch.testing.assert_close(system, embeds[: serialized.system_length], rtol=1e-5, atol=1e-6)
    live = torch.stack([state.fed_embeds[1 + 2 * k][1:11] for k in range(7)])
    assert train.shape == live.shape == (7, 10, model.config.hidden_size)

    seam_units = [3, 6]
    clean_units = [k for k in range(7) if k not in seam_units]
    torch.testing.assert_close(train[clean_units], live[clean_units], rtol=1e-5, atol=1e-6)
    scale = live.abs().max()
    assert (train[seam_units] - live[seam_units]).abs().max() <= 1e-2 * scale

    restarted = streaming_reference(model, audio, 7, drop_left_context_at_reset=True)
    torch.testing.assert_close(train, restarted, rtol=1e-5, atol=1e-6)
    plain = streaming_reference(model, audio, 7, drop_left_context_at_reset=False)
    torch.testing.assert_close(plain, live, rtol=1e-5, atol=1e-6)  # the reference is the live audio path


def test_old_per_unit_pieces_would_not_match_the_live_session():
    """Guard: encoding every unit alone (the former training layout) differs from the live stream, so the test
    above does detect a train/inference mismatch."""
    model = small_cache_model()
    audio = noise(3.0, seed=5)
    live = streaming_reference(model, audio, 3, drop_left_context_at_reset=False)
    features = processor().feature_extractor([audio[k * SR : (k + 1) * SR] for k in range(3)], return_tensors="pt")
    with torch.no_grad():
        alone = model.model.get_audio_features(
            features["input_features"], features["input_features_mask"]
        ).pooler_output
    assert (alone.view(3, 10, -1) - live).abs().max() > 1e-2 * live.abs().max()
    _, train = training_unit_embeddings(model, listen_session(audio))
    torch.testing.assert_close(train, live, rtol=1e-5, atol=1e-6)
