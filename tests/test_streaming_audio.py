"""Duplex audio front end: exact streaming mel (official mode "exact") and the per-unit duplex audio encoder.

What the official exact mode guarantees, and what is tested here:
* every emitted chunk equals the log-mel of the buffer it was cut from (same STFT, same floor: fixed -10 under 5 s,
  dynamic max-8 over the buffer from 5 s on);
* emitted frames are stable: their raw log-mel never changes with more audio, so under 5 s (pointwise floor) they
  equal the fixed-floor mel of the whole stream, and whenever no floor is active they equal the offline (chat-path)
  features of the whole audio;
* a duplex unit (102 / 104 mel frames with redundancy) yields 50 encoder frames and 10 tokens, and a stream of units
  equals the offline block-causal encoding of the same mel: the redundancy frames give the conv real context and the
  unmasked attention over the cache equals the 1-s block-causal mask, until the 30-s cache reset.
"""

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import WhisperConfig  # noqa: E402

from minicpmo.modeling.modeling_audio import (  # noqa: E402
    AudioInputError,
    AudioStreamError,
    MiniCPMOAudioEncoder,
    MiniCPMOAudioProjector,
    audio_embeddings_from_features,
    block_causal_attention_mask,
)
from minicpmo.modeling.modeling_duplex_audio import (  # noqa: E402
    encode_units as encode_units_batched,
    DuplexAudioEncoderState,
    encode_unit,
    expected_unit_mel_frames,
    needs_cache_reset,
)
from minicpmo.processing.feature_extraction_minicpmo import (  # noqa: E402
    InvalidAudioError,
    MiniCPMOFeatureExtractor,
    MultiChannelAudioError,
    UnsupportedSamplingRateError,
)
from minicpmo.processing.streaming_mel_minicpmo import (  # noqa: E402
    StreamingMelError,
    StreamingMelProcessor,
    log_mel_spectrogram,
)

SR = 16000
D_MODEL = 32
LLM_HIDDEN = 48
FIXED_FLOOR_VALUE = (-10.0 + 4.0) / 4.0


# --- builders -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def extractor() -> MiniCPMOFeatureExtractor:
    return MiniCPMOFeatureExtractor()


@pytest.fixture(scope="module")
def processor(extractor) -> StreamingMelProcessor:
    return StreamingMelProcessor(feature_extractor=extractor)


def noise(seconds: float, seed: int = 0, scale: float = 0.1) -> np.ndarray:
    """White noise: its log-mel sits far above both floors, so no floor is active (asserted where it matters)."""
    return (scale * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def feed_units(processor, audio, units, state=None, first_samples=SR):
    """Feed `first_samples` then 1-s pieces; returns the emitted chunks and the state after each call."""
    chunks, states, start = [], [], 0
    for unit in range(units):
        size = first_samples if unit == 0 else SR
        chunk, state = processor.step(audio[start : start + size], state)
        start += size
        chunks.append(chunk)
        states.append(state)
    return chunks, states


def cores(chunks, redundancy=2):
    """Core frames of emitted chunks, stitched: drop the left redundancy (none on the first) and the right one."""
    lefts = [0] + [redundancy] * (len(chunks) - 1)
    return torch.cat([chunk[..., left : left + 100] for left, chunk in zip(lefts, chunks)], dim=-1)[0]


def tiny_whisper_config(max_source_positions: int = 1500) -> WhisperConfig:
    config = WhisperConfig(
        d_model=D_MODEL,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        num_mel_bins=80,
        max_source_positions=max_source_positions,
        max_target_positions=64,
        vocab_size=100,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
        decoder_start_token_id=2,
    )
    config._attn_implementation = "sdpa"
    return config


def tiny_tower(max_source_positions: int = 1500, seed: int = 0):
    torch.manual_seed(seed)
    encoder = MiniCPMOAudioEncoder(tiny_whisper_config(max_source_positions)).eval()
    projector = MiniCPMOAudioProjector(D_MODEL, LLM_HIDDEN).eval()
    return encoder, projector


def unit_chunks(mel: torch.Tensor, units: int) -> list[torch.Tensor]:
    """Cut a mel stream [1, 80, T] the way the streaming mel emits it: [0, 102), then [100k - 2, 100k + 102)."""
    return [mel[..., max(0, 100 * k - 2) : 100 * k + 102] for k in range(units)]


def encode_units(encoder, projector, chunks, state=None):
    outputs, states = [], []
    with torch.no_grad():
        for chunk in chunks:
            embeddings, state = encode_unit(encoder, projector, chunk, state)
            outputs.append(embeddings)
            states.append(state)
    return outputs, states


# --- log-mel ---------------------------------------------------------------------------------------------------
def test_log_mel_dynamic_floor_is_the_whisper_extractor(processor, extractor):
    audio = noise(3.3, seed=1)
    audio[:4000] = 0.0  # silence, so the dynamic floor is active on some frames
    ours = log_mel_spectrogram(torch.from_numpy(audio), processor.mel_filters, dynamic_floor=True)
    reference = torch.from_numpy(extractor._torch_extract_fbank_features(audio, "cpu"))
    assert ours.shape == (80, audio.shape[0] // 160)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    assert ours.min().item() == pytest.approx(ours.max().item() - 2.0)  # floored at max - 8 (in log10 units / 4)


def test_log_mel_fixed_floor_is_minus_ten(processor):
    audio = noise(2.0, seed=2)
    audio[:8000] = 0.0
    fixed = log_mel_spectrogram(torch.from_numpy(audio), processor.mel_filters, dynamic_floor=False)
    dynamic = log_mel_spectrogram(torch.from_numpy(audio), processor.mel_filters, dynamic_floor=True)
    assert fixed.min().item() == FIXED_FLOOR_VALUE  # silent frames hit log10(1e-10) = -10 exactly
    assert dynamic.min().item() > FIXED_FLOOR_VALUE
    loud = fixed[:, 60:]  # frames well inside the noise are above both floors
    torch.testing.assert_close(loud, dynamic[:, 60:], rtol=0, atol=0)


# --- streaming mel: chunk layout --------------------------------------------------------------------------------
def test_first_chunk_is_1030_ms_and_padded_like_the_duplex_session(processor):
    assert processor.first_chunk_samples == 16480  # 1035 ms aligned down to the 160-sample hop
    assert processor.first_chunk_pad_samples == 16560  # the session pads its first unit to 1035 ms
    assert processor.chunk_samples == 16000 and processor.redundancy_frames == 2
    audio = noise(3.0, seed=3)
    chunks, states = feed_units(processor, audio, 3)
    assert [chunk.shape for chunk in chunks] == [(1, 80, 102), (1, 80, 104), (1, 80, 104)]
    first = states[0]
    assert first.samples_consumed == 16480 and first.pending.shape[0] == 80 and not first.is_first_chunk
    assert torch.equal(first.buffer[:560], torch.zeros(560))  # 560 zeros on the left, then the audio
    assert torch.equal(first.buffer[560:], torch.from_numpy(audio[:15920]))
    assert [s.frames_emitted for s in states] == [100, 200, 300]
    assert states[-1].pending.shape[0] == 80  # the 80-sample remainder travels along, as in the official session
    # the first chunk starts in the zero padding: fixed floor (buffer < 5 s) gives exactly -10
    assert chunks[0][0, :, 0].eq(FIXED_FLOOR_VALUE).all()


def test_without_padding_the_first_chunk_waits_for_16480_samples(extractor):
    processor = StreamingMelProcessor(pad_first_chunk=False, feature_extractor=extractor)
    audio = noise(2.1, seed=4)
    chunk, state = processor.step(audio[:16479])
    assert chunk is None and state.is_first_chunk and state.pending.shape[0] == 16479
    chunk, state = processor.step(audio[16479:16480], state)
    assert chunk.shape == (1, 80, 102) and state.samples_consumed == 16480 and state.pending.shape[0] == 0
    chunk, state = processor.step(audio[16480:32480], state)
    assert chunk.shape == (1, 80, 104) and state.frames_emitted == 200


def test_no_redundancy_emits_bare_100_frame_chunks(extractor):
    processor = StreamingMelProcessor(cnn_redundancy_ms=0, feature_extractor=extractor)
    chunks, _ = feed_units(processor, noise(3.0, seed=5), 3)
    assert [chunk.shape[-1] for chunk in chunks] == [100, 100, 100]


def test_step_is_pure_and_extra_audio_stays_pending(processor):
    audio = noise(3.0, seed=6)
    state = processor.initial_state()
    first, state_a = processor.step(audio[:SR], state)
    again, state_b = processor.step(audio[:SR], state)
    assert torch.equal(first, again) and torch.equal(state_a.buffer, state_b.buffer)
    assert state.buffer.numel() == 0 and state.pending.numel() == 0 and state.is_first_chunk  # untouched
    # two seconds at once: one chunk now, the rest waits; an empty call drains it
    chunk, state = processor.step(audio[SR : 3 * SR], state_a)
    assert chunk.shape[-1] == 104 and state.pending.shape[0] == SR + 80
    chunk, state = processor.step(np.zeros(0, dtype=np.float32), state)
    assert chunk.shape[-1] == 104 and state.frames_emitted == 300
    chunk, state = processor.step(np.zeros(0, dtype=np.float32), state)
    assert chunk is None and state.frames_emitted == 300


# --- streaming mel: exactness -----------------------------------------------------------------------------------
def test_each_chunk_equals_the_mel_of_its_buffer(processor, extractor):
    """Across the 5-s switch from the fixed to the dynamic floor, with silence so that both floors matter."""
    audio = noise(7.0, seed=7)
    audio[2 * SR : 3 * SR] = 0.0
    chunks, states = feed_units(processor, audio, 7)
    stream = np.concatenate([np.zeros(560, dtype=np.float32), audio])  # what the buffer holds (first-unit padding)
    for k, (chunk, state) in enumerate(zip(chunks, states)):
        buffer = stream[: state.samples_consumed]
        assert torch.equal(state.buffer, torch.from_numpy(buffer))
        if buffer.shape[0] >= 5 * SR:
            reference = torch.from_numpy(extractor._torch_extract_fbank_features(buffer, "cpu"))
        else:
            reference = log_mel_spectrogram(torch.from_numpy(buffer), processor.mel_filters, dynamic_floor=False)
        start = max(0, 100 * k - 2)
        torch.testing.assert_close(chunk[0], reference[:, start : 100 * k + 102], rtol=0, atol=0)
    assert states[3].samples_consumed < 5 * SR <= states[4].samples_consumed
    assert chunks[2].min().item() == FIXED_FLOOR_VALUE  # silence under 5 s: fixed floor
    assert chunks[4].min().item() > FIXED_FLOOR_VALUE  # dynamic floor from 5 s on


def test_stable_frames_equal_the_offline_mel_of_the_whole_stream(processor):
    """Under 5 s the floor is pointwise, so emitted frames never depend on audio that arrives later."""
    audio = noise(6.0, seed=8)
    audio[SR : SR + 4000] = 0.0
    chunks, _ = feed_units(processor, audio, 4)
    stream = np.concatenate([np.zeros(560, dtype=np.float32), audio])
    whole = log_mel_spectrogram(torch.from_numpy(stream[: 6 * SR]), processor.mel_filters, dynamic_floor=False)
    torch.testing.assert_close(cores(chunks), whole[:, :400], rtol=1e-6, atol=1e-6)
    for k, chunk in enumerate(chunks):  # the redundancy frames are the same stable values
        torch.testing.assert_close(chunk[0], whole[:, max(0, 100 * k - 2) : 100 * k + 102], rtol=1e-6, atol=1e-6)


def test_streaming_equals_chat_path_features_when_no_floor_is_active(extractor):
    processor = StreamingMelProcessor(pad_first_chunk=False, feature_extractor=extractor)
    audio = noise(8.5, seed=9)
    chunks, _ = feed_units(processor, audio, 8, first_samples=16480)
    offline = torch.from_numpy(extractor(audio, sampling_rate=SR)["input_features"][0])
    assert offline.min().item() > offline.max().item() - 2.0  # no frame sits on the dynamic floor
    torch.testing.assert_close(cores(chunks), offline[:, :800], rtol=1e-5, atol=1e-5)


def test_sliding_buffer_keeps_chunks_exact(extractor):
    processor = StreamingMelProcessor(pad_first_chunk=False, feature_extractor=extractor)
    units = 32
    audio = noise(units + 0.5, seed=10)
    chunks, states = feed_units(processor, audio, units, first_samples=16480)
    assert all(chunk.shape[-1] == 104 for chunk in chunks[1:])
    dropped = [state.samples_dropped for state in states]
    slide_unit = next(i for i, value in enumerate(dropped) if value)
    assert dropped[slide_unit] == 10 * SR  # 30-s trigger, 10-s stride
    assert states[slide_unit - 1].buffer.shape[0] < 30 * SR <= states[slide_unit - 1].buffer.shape[0] + SR
    assert max(state.buffer.shape[0] for state in states) < 30 * SR
    whole = log_mel_spectrogram(torch.from_numpy(audio[: states[-1].samples_consumed]), processor.mel_filters, True)
    torch.testing.assert_close(cores(chunks), whole[:, : 100 * units], rtol=1e-5, atol=1e-5)


def test_flush_emits_the_rest_of_the_stream(processor):
    audio = noise(3.5, seed=11)
    chunks, states = feed_units(processor, audio, 3)
    partial = audio[3 * SR : 3 * SR + 5000]
    none, state = processor.step(partial, states[-1])
    assert none is None
    tail, state = processor.flush(state)
    stream = np.concatenate([np.zeros(560, dtype=np.float32), audio[: 3 * SR + 5000]])
    whole = log_mel_spectrogram(torch.from_numpy(stream), processor.mel_filters, dynamic_floor=False)
    assert tail.shape == (1, 80, stream.shape[0] // 160 - 300)
    torch.testing.assert_close(torch.cat([cores(chunks), tail[0]], dim=-1), whole, rtol=1e-6, atol=1e-6)
    assert state.pending.numel() == 0 and state.frames_emitted == stream.shape[0] // 160
    assert processor.flush(state)[0] is None


# --- streaming mel: errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("samples", "error", "message"),
    [
        (np.zeros((2, 16000), dtype=np.float32), MultiChannelAudioError, "multi-channel"),
        (np.zeros((2, 2, 4000), dtype=np.float32), InvalidAudioError, "1-D"),
        (np.full(16000, np.nan, dtype=np.float32), InvalidAudioError, "NaN"),
        (np.zeros(16000, dtype=bool), InvalidAudioError, "dtype"),
        (np.zeros(16000, dtype=np.complex64), InvalidAudioError, "dtype"),
        ("not audio", InvalidAudioError, "numpy array or torch tensor"),
    ],
)
def test_bad_audio_raises_typed_errors(processor, samples, error, message):
    with pytest.raises(error, match=message):
        processor.step(samples)


def test_wrong_rate_and_bad_configuration_raise(extractor, processor):
    with pytest.raises(UnsupportedSamplingRateError, match="16000 Hz"):
        processor.step(np.zeros(8000, dtype=np.float32), sampling_rate=8000)
    with pytest.raises(StreamingMelError, match="hop"):
        StreamingMelProcessor(chunk_ms=1005, feature_extractor=extractor)
    with pytest.raises(StreamingMelError, match="slide stride"):
        StreamingMelProcessor(slide_trigger_seconds=10, slide_stride_seconds=10, feature_extractor=extractor)
    with pytest.raises(StreamingMelError, match="cnn_redundancy_ms"):
        StreamingMelProcessor(cnn_redundancy_ms=-10, feature_extractor=extractor)
    assert issubclass(StreamingMelError, ValueError)


# --- duplex unit encoder ----------------------------------------------------------------------------------------
def test_units_yield_ten_tokens_and_equal_the_offline_block_causal_encoding():
    encoder, projector = tiny_tower()
    mel = torch.randn(1, 80, 503, generator=torch.Generator().manual_seed(0))
    chunks = unit_chunks(mel, 5)
    assert [chunk.shape[-1] for chunk in chunks] == [102, 104, 104, 104, 104]
    outputs, states = encode_units(encoder, projector, chunks)
    assert all(out.shape == (10, LLM_HIDDEN) for out in outputs)
    assert [s.encoder_state.cached_frames for s in states] == [50, 100, 150, 200, 250]
    with torch.no_grad():
        # offline over 502 frames: encoder frames 0..249 see real mel on both conv sides, block-causal 1-s chunks
        offline = audio_embeddings_from_features(encoder, projector, mel[..., :502])[0]
    assert offline.shape == (50, LLM_HIDDEN)
    torch.testing.assert_close(torch.cat(outputs), offline, rtol=1e-5, atol=1e-5)


def test_audio_to_tokens_matches_the_offline_chat_path_when_no_floor_is_active(extractor):
    """End to end: 1-s units of white noise -> streaming mel -> duplex encoder == offline features -> offline
    block-causal encoding (the floors are the only place the two front ends differ)."""
    encoder, projector = tiny_tower(seed=1)
    processor = StreamingMelProcessor(pad_first_chunk=False, feature_extractor=extractor)
    audio = noise(5.2, seed=12)
    chunks, _ = feed_units(processor, audio, 5, first_samples=16480)
    outputs, _ = encode_units(encoder, projector, chunks)
    features = extractor(audio, sampling_rate=SR, return_tensors="pt")
    with torch.no_grad():
        offline = audio_embeddings_from_features(
            encoder, projector, features["input_features"], features["input_features_mask"]
        )[0]
    torch.testing.assert_close(torch.cat(outputs), offline[:50], rtol=1e-4, atol=1e-4)


def test_cache_resets_with_the_official_pre_crop_rule():
    """max_source_positions 151: a unit's pre-crop length is 52, so the cache of 100 frames resets (100 + 52 >= 151)
    although its 50 kept frames would still fit; positions restart at 0, conv context is kept."""
    encoder, projector = tiny_tower(max_source_positions=151, seed=2)
    mel = torch.randn(1, 80, 603, generator=torch.Generator().manual_seed(3))
    outputs, states = encode_units(encoder, projector, unit_chunks(mel, 6))
    assert [s.encoder_state.cached_frames for s in states] == [50, 100, 50, 100, 50, 100]
    assert [s.cache_resets for s in states] == [0, 0, 1, 1, 2, 2]
    # reference: offline conv over the whole mel, then each cache segment encoded block-causally from position 0
    with torch.no_grad():
        conv = encoder._convolve(mel[..., :602])[:, :300]
        reference = []
        for start in (0, 100, 200):
            hidden = conv[:, start : start + 100] + encoder.embed_positions.weight[:100]
            mask = block_causal_attention_mask(torch.tensor([100]), 100, 50, hidden.dtype)
            reference.append(projector.project_and_pool(encoder._run_layers(hidden, mask))[0])
    torch.testing.assert_close(torch.cat(outputs), torch.cat(reference), rtol=1e-5, atol=1e-5)


def test_several_streams_in_one_batch_equal_each_stream_alone():
    """Streams that joined at different units (caches of 0, 50 and 100 frames, one crossing the 30-s reset) step
    together through `encode_units` (one pass of the layers, shorter caches left-padded and masked) and give what
    each gives stepped alone, unit after unit, states included."""
    encoder, projector = tiny_tower(max_source_positions=151, seed=4)
    mels = [torch.randn(1, 80, 603, generator=torch.Generator().manual_seed(10 + i)) for i in range(3)]
    starts = [0, 1, 2]  # stream i joins at tick i
    alone = [encode_units(encoder, projector, unit_chunks(mel, 6 - start))[0] for mel, start in zip(mels, starts)]
    states = [None, None, None]
    got = [[], [], []]
    resets = set()
    with torch.no_grad():
        for tick in range(6):
            active = [i for i in range(3) if tick >= starts[i]]
            chunks = [unit_chunks(mels[i], tick - starts[i] + 1)[-1] for i in active]
            outputs, new_states = encode_units_batched(encoder, projector, chunks, [states[i] for i in active])
            for i, out, state in zip(active, outputs, new_states):
                got[i].append(out)
                states[i] = state
                resets.add(state.cache_resets)
    assert resets >= {0, 1}  # the batch held streams on both sides of a reset
    for i in range(3):
        assert len(got[i]) == len(alone[i])
        torch.testing.assert_close(torch.cat(got[i]), torch.cat(alone[i]), rtol=1e-5, atol=1e-5)
    with pytest.raises(AudioStreamError, match="mel chunks for"):
        encode_units_batched(encoder, projector, [unit_chunks(mels[0], 1)[0]], [None, None])


def test_whisper_cache_spans_at_most_30_seconds():
    """With the real 1500 positions the first reset comes before unit 29 (29 units x 50 frames = 1450 cached)."""
    cached, resets_at = 0, []
    for unit in range(60):
        frames = 102 if unit == 0 else 104
        if needs_cache_reset(cached, frames, 1500):
            resets_at.append(unit)
            cached = 0
        cached += 50
        assert cached < 1500
    assert resets_at == [29, 58]


def test_reset_gives_a_fresh_stream():
    encoder, projector = tiny_tower(seed=4)
    mel = torch.randn(1, 80, 303, generator=torch.Generator().manual_seed(5))
    chunks = unit_chunks(mel, 3)
    outputs, states = encode_units(encoder, projector, chunks)
    fresh = states[-1].reset()
    assert fresh == DuplexAudioEncoderState() and fresh.is_first_unit and expected_unit_mel_frames(fresh) == 102
    again, _ = encode_units(encoder, projector, chunks, fresh)
    for first, second in zip(outputs, again):
        torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_unit_uses_its_own_left_redundancy_not_the_previous_tail():
    """The official conv reads the re-emitted left redundancy frames (they change when the dynamic floor moves)."""
    encoder, projector = tiny_tower(seed=6)
    mel = torch.randn(1, 80, 203, generator=torch.Generator().manual_seed(7))
    chunks = unit_chunks(mel, 2)
    _, states = encode_units(encoder, projector, chunks[:1])
    changed = chunks[1].clone()
    changed[..., :2] += 1.0
    with torch.no_grad():
        plain, _ = encode_unit(encoder, projector, chunks[1], states[0])
        shifted, _ = encode_unit(encoder, projector, changed, states[0])
        other_tail = dataclasses.replace(states[0].encoder_state, mel_tail=torch.zeros(1, 80, 2))
        replayed, _ = encode_unit(encoder, projector, changed, dataclasses.replace(states[0], encoder_state=other_tail))
    assert not torch.allclose(plain, shifted)  # the first conv output reads those frames
    torch.testing.assert_close(replayed, shifted, rtol=0, atol=0)  # the tail stored by the last step plays no part


def test_bad_units_raise_typed_errors():
    encoder, projector = tiny_tower(seed=8)
    mel = torch.randn(1, 80, 210)
    with pytest.raises(AudioStreamError, match="first unit needs 102"):
        encode_unit(encoder, projector, mel[..., :104])
    _, state = encode_unit(encoder, projector, mel[..., :102])
    with pytest.raises(AudioStreamError, match="needs 104"):
        encode_unit(encoder, projector, mel[..., :102], state)
    with pytest.raises(AudioStreamError, match=r"\[1, mel_bins, frames\]"):
        encode_unit(encoder, projector, torch.randn(2, 80, 102))
    with pytest.raises(AudioInputError, match="80 mel bins"):
        encode_unit(encoder, projector, torch.randn(1, 64, 102))
