"""The official checkpoint layout loads with no missing/unexpected keys and is written back unchanged.

The full-size check goes through `save_pretrained` itself (with the safetensors writer captured), so it sees the names,
shapes and dtypes that would be written to disk, the official float32 buffers included.
"""

import json
import re
from collections import Counter

import pytest
import torch
import transformers.modeling_utils
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


@pytest.fixture(scope="module")
def full_model_on_meta():
    with torch.device("meta"):
        model = MiniCPMOForConditionalGeneration(official_config())
    return model.to(torch.bfloat16)  # the official checkpoint's dtype


def official_tsv(shared_dir) -> dict:
    lines = (shared_dir / "reference" / "official_state_dict.tsv").read_text().splitlines()
    rows = (line.split("\t") for line in lines)
    return {name: (tuple(json.loads(shape)), dtype) for name, shape, dtype in rows}


def test_full_size_save_writes_exactly_the_official_keys_shapes_and_dtypes(
    full_model_on_meta, shared_dir, tmp_path, monkeypatch
):
    written = {}

    def capture(shard, filename, metadata=None):
        written.update({k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in shard.items()})

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", capture)
    monkeypatch.setattr(full_model_on_meta, "save_token2wav", lambda directory: None)  # meta tensors; not official
    full_model_on_meta.save_pretrained(tmp_path)
    expected = official_tsv(shared_dir)
    assert set(written) == set(expected), (sorted(set(written) - set(expected))[:5],
                                           sorted(set(expected) - set(written))[:5])
    assert {k: v for k, v in written.items() if v != expected[k]} == {}
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["MiniCPMO"]


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
    # As the official checkpoint stores them: weights plus the float32 rotary and resampler tables.
    official_state = {to_official_name(k): v.contiguous() for k, v in model.checkpoint_state_dict().items()
                      if not k.startswith("token2wav.")}
    buffers = {"resampler.pos_embed", "llm.model.rotary_emb.inv_freq", "tts.model.rotary_emb.inv_freq"}
    assert buffers <= official_state.keys()
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
