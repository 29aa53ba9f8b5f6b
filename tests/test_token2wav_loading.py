"""token2wav is built only when a config names it or its weights are loaded; speaking without it is a typed error."""

import json

import numpy as np
import pytest
import torch
from helpers import processor

from minicpmo import MiniCPMOConfig, MiniCPMOForConditionalGeneration, tiny_config
from minicpmo.errors import CheckpointError, SpeechOutputError
from minicpmo.voices import load_voice


def _official_style(seed: int = 0):
    """A tiny model whose config, like the official one, names no token2wav."""
    torch.manual_seed(seed)
    return MiniCPMOForConditionalGeneration(tiny_config(token2wav_config=None)).eval()


def test_official_full_size_config_builds_no_token2wav():
    with torch.device("meta"):
        model = MiniCPMOForConditionalGeneration(MiniCPMOConfig())
    assert getattr(model, "token2wav", None) is None
    assert not any(name.startswith("token2wav.") for name, _ in model.named_parameters())
    assert model.tts is not None  # the speech decoder is part of the official checkpoint


def test_speaking_without_token2wav_is_a_typed_error_naming_load_token2wav():
    model = _official_style()
    with pytest.raises(SpeechOutputError, match="load_token2wav"):
        model.prepare_voice(load_voice("en_dlc"))
    msgs = [{"role": "user", "content": "hello"}]
    with pytest.raises(SpeechOutputError, match="load_token2wav"):
        model.chat(msgs, processor=processor(), generate_audio=True, ref_audio=load_voice("en_dlc"), max_new_tokens=2)
    with pytest.raises(SpeechOutputError, match="load_token2wav"):
        model.duplex_session(processor(), ref_audio=load_voice("en_dlc"))
    # Text still works, and a duplex session without speech opens.
    assert isinstance(model.chat(msgs, processor=processor(), max_new_tokens=2), str)
    model.duplex_session(processor(), ref_audio=load_voice("en_dlc"), generate_audio=False).close()


def test_official_folder_plus_token2wav_folder_loads_and_speaks_like_the_original(tmp_path):
    torch.manual_seed(0)
    original = MiniCPMOForConditionalGeneration(tiny_config()).eval()
    original.save_pretrained(tmp_path / "ours")
    # The official layout: config.json without token2wav_config, token2wav weights in their own folder.
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    config["token2wav_config"] = None
    (tmp_path / "ours" / "config.json").write_text(json.dumps(config))
    loaded = MiniCPMOForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    assert loaded.token2wav_weights_loaded and loaded.config.token2wav_config is None
    assert loaded.token2wav.config == original.token2wav.config
    for name, tensor in original.token2wav.state_dict().items():
        torch.testing.assert_close(loaded.token2wav.state_dict()[name], tensor, rtol=0, atol=0)
    assert all(p.dtype == torch.float32 for p in loaded.token2wav.parameters())
    codes = torch.randint(0, original.config.tts_config.num_audio_tokens - 1, (30,))
    voice = load_voice("en_dlc")
    waves = [m.token2wav.synthesize(codes, m.prepare_voice(voice), generator=torch.Generator().manual_seed(0))
             for m in (original, loaded)]
    np.testing.assert_array_equal(waves[0].numpy(), waves[1].numpy())
    # And it saves again: token2wav stays out of model.safetensors, in its folder.
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "token2wav" / "model.safetensors").is_file()


def test_load_token2wav_into_a_model_without_one_needs_every_weight(tmp_path):
    torch.manual_seed(0)
    source = MiniCPMOForConditionalGeneration(tiny_config()).eval()
    source.save_token2wav(tmp_path / "full")
    model = _official_style()
    model.load_token2wav(tmp_path / "full")
    assert model.token2wav_weights_loaded and model.token2wav is not None

    import safetensors.torch

    state = safetensors.torch.load_file(str(tmp_path / "full" / "model.safetensors"))
    dropped = sorted(state)[0]
    del state[dropped]
    (tmp_path / "partial").mkdir()
    safetensors.torch.save_file(state, str(tmp_path / "partial" / "model.safetensors"))
    (tmp_path / "partial" / "config.json").write_text((tmp_path / "full" / "config.json").read_text())
    bare = _official_style()
    with pytest.raises(CheckpointError, match="missing"):
        bare.load_token2wav(tmp_path / "partial")
    assert getattr(bare, "token2wav", None) is None  # nothing half-built is left behind
