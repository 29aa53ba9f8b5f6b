"""The official checkpoint layout loads with no missing/unexpected keys and is written back unchanged."""

import json
import re
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file, save_file

from minicpmo import MiniCPMOForConditionalGeneration, official_config, tiny_config
from minicpmo.modeling.modeling_minicpmo import OFFICIAL_KEY_RENAMES

OFFICIAL_PREFIXES = ("llm.", "vpm.", "resampler.", "apm.", "audio_projection_layer.", "tts.")
OFFICIAL_PART_COUNTS = {
    "llm": 8_189_195_264,
    "vpm": 417_792_240,
    "resampler": 88_907_776,
    "apm": 307_216_384,
    "audio_projection_layer": 20_979_712,
    "tts": 347_696_290,
}


def to_official_name(name: str) -> str:
    for official, ours in OFFICIAL_KEY_RENAMES.items():
        ours_pattern = "^" + re.escape(ours)
        if re.match(ours_pattern, name):
            return re.sub(ours_pattern, official.lstrip("^").replace("\\", ""), name, count=1)
    return name


def official_rows(shared_dir, prefixes=OFFICIAL_PREFIXES):
    rows = {}
    for line in (shared_dir / "reference" / "official_state_dict.tsv").read_text().splitlines():
        name, shape, _dtype = line.split("\t")
        if name.startswith(prefixes) and not name.endswith(("rotary_emb.inv_freq", "pos_embed")):
            rows[name] = tuple(json.loads(shape))
    return rows


@pytest.fixture(scope="module")
def full_model_on_meta():
    with torch.device("meta"):
        return MiniCPMOForConditionalGeneration(official_config())


def test_full_size_names_and_shapes_equal_official(full_model_on_meta, shared_dir):
    ours = {to_official_name(n): tuple(p.shape) for n, p in full_model_on_meta.named_parameters()
            if not n.startswith("token2wav.")}
    expected = official_rows(shared_dir)
    assert set(ours) == set(expected), (sorted(set(ours) - set(expected))[:5], sorted(set(expected) - set(ours))[:5])
    assert ours == expected
    assert Counter(ours.values()) == Counter(expected.values())


def test_full_size_parameter_counts(full_model_on_meta):
    counts = Counter()
    for name, param in full_model_on_meta.named_parameters():
        if name.startswith("token2wav."):
            continue  # not part of the official main checkpoint (separate token2wav files)
        counts[to_official_name(name).split(".")[0]] += param.numel()
    assert dict(counts) == OFFICIAL_PART_COUNTS


def test_official_checkpoint_loads_and_saves_official_names(tmp_path):
    torch.manual_seed(0)
    model = MiniCPMOForConditionalGeneration(tiny_config()).eval()
    official_state = {to_official_name(k): v.contiguous() for k, v in model.state_dict().items()
                      if not k.startswith("token2wav.")}
    assert all(k.startswith(OFFICIAL_PREFIXES) for k in official_state)
    source = tmp_path / "official"
    source.mkdir()
    model.config.save_pretrained(source)
    save_file(official_state, str(source / "model.safetensors"), metadata={"format": "pt"})

    loaded, info = MiniCPMOForConditionalGeneration.from_pretrained(source, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not loaded.token2wav_weights_loaded  # the official main checkpoint has no token2wav
    for name, tensor in loaded.state_dict().items():
        if name.startswith("token2wav."):
            continue
        torch.testing.assert_close(tensor, model.state_dict()[name], rtol=0, atol=0)

    out = tmp_path / "resaved"
    loaded.save_pretrained(out)
    resaved = load_file(str(out / "model.safetensors"))
    assert set(resaved) == set(official_state)
    assert (out / "token2wav" / "model.safetensors").is_file()  # token2wav weights go next to the checkpoint
