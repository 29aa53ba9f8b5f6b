"""Speech output on the tiny model: generate(return_audio=True), streaming chat, voice cloning."""

import numpy as np
import pytest
import soundfile
import torch
from helpers import processor, tiny_model

from minicpmo.modeling.modeling_speech_decoder import SpeechSamplingConfig
from minicpmo.modeling.modeling_speech_output import SpeechOutputError, find_reference_audio, spoken_span
from minicpmo.voices import load_voice

QUESTION = [{"role": "user", "content": [{"type": "text", "text": "Say something."}]}]
FAST_SPEECH = SpeechSamplingConfig(do_sample=False, min_new_codes=0, max_new_codes=40)


def test_spoken_span_runs_from_tts_bos_to_tts_eos():
    ids = [1, 2, 151703, 5, 6, 7, 151704, 151645]
    assert spoken_span(ids, prompt_length=3) == (3, 6)
    assert spoken_span([1, 2, 3, 4], prompt_length=2) == (2, 4)  # no <|tts_bos|>: the generated part


def test_reference_audio_prefers_the_system_message():
    voice, other = np.zeros(10), np.ones(10)
    msgs = [{"role": "user", "content": [{"type": "audio", "audio": other}]},
            {"role": "system", "content": [{"type": "audio", "audio": voice}]}]
    assert find_reference_audio(msgs) is voice
    assert find_reference_audio(msgs[:1]) is other


def test_generate_return_audio_gives_codes_and_24k_waveform(tmp_path):
    model = tiny_model()
    inputs = processor().apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=True,
                                             return_tensors="pt", use_tts_template=True)
    assert inputs["input_ids"][0, -1].item() == 151703  # <|tts_bos|> ends the prompt
    out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, return_audio=True,
                         ref_audio=load_voice("en_dlc"), speech_sampling=FAST_SPEECH)
    assert out.sequences.shape == (1, inputs["input_ids"].shape[1] + 6)
    codes, wav = out.speech_codes[0], out.waveforms[0]
    assert codes.dtype == torch.long and 0 < codes.numel() <= 40 and int(codes.max()) < 6561
    assert out.sample_rate == 24000 and wav.shape == (codes.numel() * 960,)
    assert torch.isfinite(wav).all()
    soundfile.write(tmp_path / "out.wav", wav.numpy(), out.sample_rate)
    assert soundfile.info(tmp_path / "out.wav").frames == wav.shape[0]


def test_streaming_chat_yields_audio_before_the_text_is_finished():
    model = tiny_model()
    chunks = model.chat(QUESTION, processor=processor(), generate_audio=True, stream=True,
                        ref_audio=load_voice("en_dlc"), max_new_tokens=30, min_new_tokens=30, text_chunk_tokens=10,
                        speech_sampling=SpeechSamplingConfig(do_sample=False, min_new_codes=30),
                        max_codes_per_chunk=30)
    first = next(chunks)
    assert first.text and first.audio.size > 0 and not first.is_last  # audio while text is still coming
    rest = list(chunks)
    assert rest[-1].is_last
    total = np.concatenate([first.audio] + [c.audio for c in rest])
    assert total.dtype == np.float32 and np.isfinite(total).all()


def test_non_streaming_chat_returns_text_and_audio():
    model = tiny_model()
    text, wav = model.chat(QUESTION, processor=processor(), generate_audio=True, ref_audio=load_voice("en_dlc"),
                           max_new_tokens=5, min_new_tokens=5, speech_sampling=FAST_SPEECH)
    assert isinstance(text, str) and wav.ndim == 1 and wav.size > 0
    assert isinstance(model.chat(QUESTION, processor=processor(), max_new_tokens=3), str)


def test_speech_without_a_voice_is_a_typed_error():
    with pytest.raises(SpeechOutputError, match="reference voice"):
        tiny_model().chat(QUESTION, processor=processor(), generate_audio=True, max_new_tokens=2)


def test_voice_cloning_conditions_llm_prompt_and_token2wav():
    model = tiny_model()
    voices = [load_voice("en_dlc"), load_voice("minicpm_signature")]
    prompts = [model.prepare_voice(v) for v in voices]
    embeddings = [p.speaker_embedding.flatten() for p in prompts]
    # (random tiny weights give tiny magnitudes; the flow L2-normalises the embedding, so compare directions)
    assert torch.nn.functional.cosine_similarity(embeddings[0], embeddings[1], dim=0) < 0.999

    # The same codes through the two voices give measurably different spectra. The vocoder's source noise is
    # fixed (same generator for both), so the difference comes from the voice alone: with it, the same voice
    # twice is bit-identical, while the two voices differ in the flow's mel and in the waveform spectrum.
    codes = torch.arange(100, 150)

    def synthesize(prompt):
        return model.token2wav.synthesize(codes, prompt, generator=torch.Generator().manual_seed(0))

    def spectrum(wav):
        magnitude = torch.stft(wav, 1024, 256, window=torch.hann_window(1024), return_complex=True).abs().mean(-1)
        return magnitude / magnitude.sum()

    assert torch.equal(synthesize(prompts[0]), synthesize(prompts[0]))
    mels = [model.token2wav.flow.inference(codes[None], p.prompt_tokens, p.prompt_mel, p.speaker_embedding)
            for p in prompts]
    assert (mels[0] - mels[1]).abs().mean() > 0.5
    difference = (spectrum(synthesize(prompts[0])) - spectrum(synthesize(prompts[1]))).abs().sum()
    assert difference > 0.02, difference

    # The reference voice in the system message enters the LLM prompt as audio features.
    msgs = [{"role": "system", "content": [{"type": "text", "text": "Clone the voice."},
                                           {"type": "audio", "audio": voices[0]}]}] + QUESTION
    inputs = processor().apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                             return_tensors="pt")
    assert "input_features" in inputs and int(model.model.audio_slot_mask(inputs["input_ids"]).sum()) > 0
