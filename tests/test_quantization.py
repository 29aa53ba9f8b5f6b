"""Quantized loading through transformers' `quantization_config` (torchao, the [quant] extra) on the tiny model:
which modules are quantized, agreement with the float model, chat / speech / duplex on the quantized model, and a
saved quantized checkpoint loading back quantized with the same outputs."""

import os

import numpy as np
import pytest
import torch
from helpers import processor, tiny_model, tone

from minicpmo import MiniCPMOForConditionalGeneration, QuantizationError, quantization_config
from minicpmo.quantization import KEPT_IN_FLOAT, quantized_modules

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("torchao")

GROUP = 32  # divides every LLM input size of the tiny config (64, 128)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_ids():
    return processor().tokenizer("The quick brown fox jumps over the lazy dog. " * 4, return_tensors="pt").input_ids


def load(folder, weights=None, **options):
    config = None if weights is None else quantization_config(weights, group_size=GROUP, **options)
    return MiniCPMOForConditionalGeneration.from_pretrained(folder, quantization_config=config).eval()


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits[0]


def test_bad_settings_get_typed_errors():
    with pytest.raises(QuantizationError, match="weights must be one of"):
        quantization_config("int3")
    with pytest.raises(QuantizationError, match="group_size must be >= 1"):
        quantization_config("int4", group_size=0)


def test_int8_quantizes_the_llm_only_and_agrees_with_the_float_model(saved, text_ids):
    reference, model = load(saved), load(saved, "int8")
    names = quantized_modules(model)
    llm_linears = [name for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and name.startswith("model.language_model.")]
    assert set(llm_linears) | {"lm_head"} == set(names)
    assert set(names.values()) == {"Int8Tensor"}
    assert not any(name.startswith(KEPT_IN_FLOAT + ("tts",)) for name in names)
    ref, got = logits(reference, text_ids), logits(model, text_ids)
    # int8 with per-row scales: logits within 0.1 of the float model's spread; the greedy token (argmax) of the
    # float model at >= 80 % of positions (0.95 measured; the random tiny model's logits are nearly flat)
    assert (got - ref).abs().max() < 0.1 * ref.std()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8


def test_int4_rounds_coarser_than_int8(saved, text_ids):
    ref = logits(load(saved), text_ids)
    int8, int4 = logits(load(saved, "int8"), text_ids), logits(load(saved, "int4"), text_ids)
    assert set(quantized_modules(load(saved, "int4")).values()) == {"IntxUnpackedToInt8Tensor"}
    assert (int4 - ref).abs().mean() > 2 * (int8 - ref).abs().mean()


def test_speech_decoder_is_quantized_only_when_asked(saved):
    names = quantized_modules(load(saved, "int8", speech_decoder=True))
    assert any(name.startswith("tts.") for name in names)
    assert not any(name.startswith(KEPT_IN_FLOAT) for name in names)


def test_the_int8_model_chats_speaks_and_runs_duplex(saved):
    from minicpmo.voices import load_voice

    model, proc = load(saved, "int8"), processor()
    text = model.chat([{"role": "user", "content": "Say something."}], proc, max_new_tokens=6)
    assert isinstance(text, str)
    text, waveform = model.chat([{"role": "user", "content": "Say something."}], proc, max_new_tokens=6,
                                generate_audio=True, ref_audio=load_voice("en_dlc"), max_codes_per_chunk=25)
    assert waveform is not None and np.isfinite(np.asarray(waveform)).all()
    session = model.duplex_session(proc, force_listen_count=0, listen_bias=-1e9, max_speak_tokens_per_unit=3)
    outs = [session.step(tone(1.0, 300 + 50 * k)) for k in range(2)]
    assert [out.unit_index for out in outs] == [0, 1] and all(out.action == "speak" for out in outs)
    session.close()


def test_a_saved_quantized_checkpoint_loads_back_quantized_with_the_same_logits(saved, tmp_path, text_ids):
    model = load(saved, "int8")
    model.save_pretrained(tmp_path / "int8")
    again = MiniCPMOForConditionalGeneration.from_pretrained(tmp_path / "int8").eval()
    assert quantized_modules(again) == quantized_modules(model)
    torch.testing.assert_close(logits(again, text_ids), logits(model, text_ids), rtol=0, atol=1e-6)
    sizes = {folder: sum(path.stat().st_size for path in (saved if folder == "float" else tmp_path / "int8")
                         .glob("*.safetensors")) for folder in ("float", "int8")}
    assert sizes["int8"] < sizes["float"]


def test_nf4_through_bitsandbytes_quantizes_the_llm_and_chats(saved, text_ids):
    pytest.importorskip("bitsandbytes")
    reference = load(saved)
    model = MiniCPMOForConditionalGeneration.from_pretrained(saved, quantization_config=quantization_config("nf4"),
                                                             device_map="cpu").eval()
    names = quantized_modules(model)
    assert set(names.values()) == {"Params4bit"} and len(names) == len(quantized_modules(load(saved, "int8")))
    assert not any(name.startswith(KEPT_IN_FLOAT + ("tts",)) for name in names)
    ref, got = logits(reference, text_ids), logits(model, text_ids).float()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.5  # 0.73 measured on the near-flat tiny model
    assert isinstance(model.chat([{"role": "user", "content": "Say something."}], processor(), max_new_tokens=4), str)
