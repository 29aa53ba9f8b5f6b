"""The turn-based chat path against the official chat() (spec §5 and §9), on the tiny model.

The official chat() turns each message's items into one string (placeholders for media, joined with "\n", or ""
in omni mode), renders the chat template of the official tokenizer_config.json with `use_tts_template` on when the
messages hold audio, and generates from embeddings, so its repetition penalty sees generated tokens only.
"""

import json

import numpy as np
import pytest
import torch
from helpers import image, processor, tiny_model, tone
from transformers.utils.chat_template_utils import render_jinja_template

import minicpmo.modeling.modeling_speech_output as speech_output
from minicpmo.modeling.modeling_speech_decoder import SpeechSamplingConfig
from minicpmo.voices import load_voice

PLACEHOLDERS = {"image": "<image>./</image>", "audio": "<audio>./</audio>"}
FAST_SPEECH = SpeechSamplingConfig(do_sample=False, min_new_codes=0, max_new_codes=12)


def official_prompt(shared_dir, messages, omni_mode=False, use_tts_template=None):
    """The official chat() prompt: items -> one string per message, then the official Jinja template."""
    template = json.loads((shared_dir / "tokenizer" / "tokenizer_config.json").read_text())["chat_template"]
    has_audio = any(isinstance(item, dict) and item["type"] == "audio"
                    for message in messages if isinstance(message["content"], list) for item in message["content"])
    flat = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            parts = [item["text"] if item["type"] == "text" else PLACEHOLDERS[item["type"]] for item in content]
            content = ("" if omni_mode else "\n").join(parts)
        flat.append({"role": message["role"], "content": content})
    rendered, _ = render_jinja_template(
        conversations=[flat], chat_template=template, add_generation_prompt=True, enable_thinking=False,
        use_tts_template=has_audio if use_tts_template is None else use_tts_template)
    return rendered[0]


VOICE_SYSTEM = {"role": "system", "content": [
    {"type": "text", "text": "Clone the voice in the provided audio prompt."}, {"type": "audio", "audio": tone(1.0)},
    {"type": "text", "text": "As an assistant, you will speak using this voice style."}]}
CONVERSATIONS = {
    "text only": [{"role": "user", "content": [{"type": "text", "text": "Describe a cat."}]}],
    "image": [{"role": "user", "content": [{"type": "image", "image": image(64, 48)},
                                           {"type": "text", "text": "What is this?"}]}],
    "audio question": [{"role": "user", "content": [{"type": "audio", "audio": tone(1.5)},
                                                    {"type": "text", "text": "Answer the question."}]}],
    "voice system + text": [VOICE_SYSTEM, {"role": "user", "content": [{"type": "text", "text": "Hello."}]}],
    "multi-turn with audio": [
        {"role": "user", "content": [{"type": "audio", "audio": tone(1.0)}]},
        {"role": "assistant", "content": "Hi there."},
        {"role": "user", "content": [{"type": "text", "text": "And now?"}]}],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_default_prompt_equals_the_official_template(shared_dir, name):
    messages = CONVERSATIONS[name]
    expected = official_prompt(shared_dir, messages)
    assert processor().apply_chat_template(messages, add_generation_prompt=True) == expected
    assert expected.endswith("<|tts_bos|>") == (name not in ("text only", "image"))


def test_explicit_overrides_are_kept(shared_dir):
    messages = CONVERSATIONS["audio question"]
    plain = processor().apply_chat_template(messages, add_generation_prompt=True, use_tts_template=False)
    assert plain == official_prompt(shared_dir, messages, use_tts_template=False)
    assert not plain.endswith("<|tts_bos|>")
    omni = processor().apply_chat_template(messages, add_generation_prompt=True, omni_mode=True)
    assert omni == official_prompt(shared_dir, messages, omni_mode=True)
    assert "<audio>./</audio>Answer" in omni


def captured_chat_inputs(monkeypatch, model, messages, **chat_kwargs):
    """The inputs chat() hands to its decoding loop."""
    seen = {}

    def stream_chat(inputs, *args, **kwargs):
        seen.update(inputs)
        return iter(())

    monkeypatch.setattr(model, "_stream_chat", stream_chat)
    model.chat(messages, processor=processor(), **chat_kwargs)
    return seen


@pytest.mark.parametrize("name", ["text only", "audio question", "voice system + text"])
def test_chat_prompt_ids_equal_the_official_prompt_ids(monkeypatch, shared_dir, name):
    messages = CONVERSATIONS[name]
    model = tiny_model()
    seen = captured_chat_inputs(monkeypatch, model, messages)  # no speech generated: still the official prompt
    audio = [item["audio"] for m in messages if isinstance(m["content"], list) for item in m["content"]
             if item["type"] == "audio"]
    expected = processor()(text=official_prompt(shared_dir, messages), audio=audio or None, return_tensors="pt")
    assert torch.equal(seen["input_ids"], expected["input_ids"])
    assert "ref_audio" not in seen  # the voice is not a model input


def test_chat_accepts_omni_mode_and_use_tts_template(monkeypatch, shared_dir):
    messages = CONVERSATIONS["audio question"]
    model = tiny_model()
    tokenizer = processor().tokenizer
    omni = captured_chat_inputs(monkeypatch, model, messages, omni_mode=True)
    text = tokenizer.decode(omni["input_ids"][0])
    assert "<|audio_end|>Answer the question." in text and text.endswith("<|tts_bos|>")
    plain = captured_chat_inputs(monkeypatch, model, messages, use_tts_template=False)
    assert not tokenizer.decode(plain["input_ids"][0]).endswith("<|tts_bos|>")
    frames = [image(64, 48, seed=k) for k in range(2)]
    video = [{"role": "user", "content": [{"type": "video", "video": frames, "audio": tone(2.0)},
                                          {"type": "text", "text": "What happens?"}]}]
    text = tokenizer.decode(captured_chat_inputs(monkeypatch, model, video, max_slice_nums=1)["input_ids"][0])
    assert "<|audio_end|>What happens?" in text  # video: omni mode by default, items joined with ""


def record_penalty_histories(monkeypatch) -> list:
    """The token history chat()'s logits processors (the repetition penalty) see at each decoding step."""
    histories = []
    real = speech_output.text_logits_processors

    def recording(*args, **kwargs):
        processors = real(*args, **kwargs)

        def run(history, scores):
            histories.append(history[0].tolist())
            return processors(history, scores)

        return run

    monkeypatch.setattr(speech_output, "text_logits_processors", recording)
    return histories


def test_chat_repetition_penalty_sees_generated_tokens_only(monkeypatch):
    histories = record_penalty_histories(monkeypatch)
    tiny_model().chat(CONVERSATIONS["text only"], processor=processor(), max_new_tokens=5, min_new_tokens=5)
    # Step t sees exactly the t tokens generated before it, never a prompt id.
    assert [len(h) for h in histories] == list(range(5))
    assert all(h == histories[-1][:len(h)] for h in histories)


def test_chat_penalty_leaves_prompt_tokens_unpenalised(monkeypatch):
    """With a huge penalty, a prompt token made the greedy choice is still chosen first (it was never generated),
    and not again (then it was)."""
    model = tiny_model()
    inputs = processor().apply_chat_template(CONVERSATIONS["text only"], add_generation_prompt=True, tokenize=True,
                                             return_dict=True, return_tensors="pt")
    favoured = processor().tokenizer(" cat", add_special_tokens=False)["input_ids"][0]
    assert favoured in inputs["input_ids"][0].tolist()

    def steer(module, args, logits):
        logits = logits.clone()
        logits[..., favoured] = logits.max() + 5.0  # positive: a penalty of 1e4 divides it below the rest
        return logits

    histories = record_penalty_histories(monkeypatch)
    handle = model.lm_head.register_forward_hook(steer)
    try:
        model.chat(CONVERSATIONS["text only"], processor=processor(), max_new_tokens=3, min_new_tokens=3,
                   repetition_penalty=1e4)
    finally:
        handle.remove()
    generated = histories[-1]
    assert generated[0] == favoured and favoured not in generated[1:]


def test_generate_from_inputs_embeds_equals_generate_from_ids():
    model = tiny_model()
    inputs = processor().apply_chat_template(CONVERSATIONS["text only"], add_generation_prompt=True, tokenize=True,
                                             return_dict=True, return_tensors="pt")
    from_ids = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], max_new_tokens=6,
                                 min_new_tokens=6, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    assert from_embeds.shape == (1, 6)  # new tokens only, as transformers returns for embeddings
    assert torch.equal(from_embeds, from_ids[:, prompt_length:])
    speech = model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], max_new_tokens=6,
                            min_new_tokens=6, do_sample=False, return_audio=True, ref_audio=load_voice("en_dlc"),
                            speech_sampling=FAST_SPEECH)
    assert torch.equal(speech.sequences, from_embeds) and speech.waveforms[0].numel() > 0


def test_generate_return_audio_takes_the_system_voice_from_the_processor(monkeypatch):
    model = tiny_model()
    voice = load_voice("en_dlc")
    messages = [{"role": "system", "content": [{"type": "text", "text": "Speak like this."},
                                               {"type": "audio", "audio": voice}]},
                {"role": "user", "content": [{"type": "text", "text": "Say something."}]}]
    inputs = processor().apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                             return_tensors="pt")
    assert inputs["input_ids"][0, -1].item() == 151703  # audio in the messages: <|tts_bos|>
    np.testing.assert_array_equal(np.asarray(inputs["ref_audio"]), voice)
    voices = []
    real_synthesize = model.token2wav.synthesize

    def synthesize(codes, prompt, **kwargs):
        voices.append(prompt)
        return real_synthesize(codes, prompt, **kwargs)

    monkeypatch.setattr(model.token2wav, "synthesize", synthesize)
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, return_audio=True,
                    speech_sampling=FAST_SPEECH, n_timesteps=2)
    handed = model.generate(**inputs, **settings)
    explicit_inputs = {k: v for k, v in inputs.items() if k != "ref_audio"}
    explicit = model.generate(**explicit_inputs, ref_audio=voice, **settings)
    assert torch.equal(handed.sequences, explicit.sequences)
    assert torch.equal(handed.speech_codes[0], explicit.speech_codes[0])
    model.generate(**explicit_inputs, ref_audio=load_voice("minicpm_signature"), **settings)
    handed_voice, explicit_voice, other_voice = voices
    for field in ("prompt_tokens", "prompt_mel", "speaker_embedding"):
        assert torch.equal(getattr(handed_voice, field), getattr(explicit_voice, field)), field
    assert not torch.equal(handed_voice.prompt_tokens, other_voice.prompt_tokens)
