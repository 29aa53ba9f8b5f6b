"""What `save_pretrained` and `python -m minicpmo.export --from` write is the official checkpoint layout.

Serving engines (vllm-omni, sglang-omni, the llama.cpp-omni converter) route on config.json's
`"architectures": ["MiniCPMO"]`, `version`, `tts_config` and the official key names, so a checkpoint written here
must carry them; loading it back with this package must still work. The full-size key/shape/dtype check through
`save_pretrained` is in test_official_weights.py.
"""

import json
import re

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel

import minicpmo  # noqa: F401  (registers the Auto classes)
from minicpmo import MiniCPMOForConditionalGeneration, official_config, tiny_config
from minicpmo.export import main as export_main

# Keys of the reconstructed official config.json that a plain save_pretrained does not write, and why.
NOT_WRITTEN = {
    "_comment": "a note of the reconstruction, not a key of the real file",
    "auto_map": "it names code files next to config.json; only the export writes them (and its own auto_map)",
}
SUB_CONFIGS = ("vision_config", "audio_config", "tts_config", "slice_config")
IDS = torch.tensor([[151644, 872, 198, 9707, 11, 1879, 0]])


def official_config_json(shared_dir) -> dict:
    return json.loads((shared_dir / "reference" / "official_config_reconstructed.json").read_text())


def official_tsv(shared_dir) -> dict:
    lines = (shared_dir / "reference" / "official_state_dict.tsv").read_text().splitlines()
    rows = (line.split("\t") for line in lines)
    return {name: dtype for name, _shape, dtype in rows}


def layer_pattern(name: str) -> str:
    """`llm.model.layers.7.mlp.up_proj.weight` -> `llm.model.layers.#.mlp.up_proj.weight` (layer counts differ)."""
    return re.sub(r"\.\d+(?=\.)", ".#", name)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model built in bfloat16 (the official dtype) written by save_pretrained."""
    torch.manual_seed(0)
    model = MiniCPMOForConditionalGeneration._from_config(tiny_config(), dtype=torch.bfloat16).eval()
    folder = tmp_path_factory.mktemp("saved")
    model.save_pretrained(folder)
    return model, folder


def assert_official_config(config: dict, official: dict) -> None:
    assert config["architectures"] == ["MiniCPMO"]
    assert config["version"] == "4.5" and config["model_type"] == "minicpmo"
    assert isinstance(config["tts_config"], dict) and config["tts_config"]["model_type"] == "minicpmtts"
    assert set(official) - set(config) == set(NOT_WRITTEN)
    for sub in SUB_CONFIGS:
        assert set(official[sub]) <= set(config[sub]), (sub, sorted(set(official[sub]) - set(config[sub])))


def test_saved_config_has_the_official_fields(saved, shared_dir):
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    assert_official_config(config, official_config_json(shared_dir))
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"


def test_full_size_config_saves_the_official_values(shared_dir, tmp_path):
    official = official_config_json(shared_dir)
    # As PreTrainedModel.save_pretrained leaves it just before writing config.json.
    official_config(architectures=["MiniCPMOForConditionalGeneration"]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert_official_config(config, official)
    skip = set(NOT_WRITTEN) | set(SUB_CONFIGS)
    differ = {k: (v, config[k]) for k, v in official.items() if k not in skip and config[k] != v}
    assert differ == {}
    for sub in SUB_CONFIGS:
        assert {k: config[sub][k] for k in official[sub]} == official[sub]


def test_saved_weights_use_the_official_names_and_dtypes_and_load_back(saved, shared_dir):
    model, folder = saved
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        written = {k: str(handle.get_slice(k).get_dtype()) for k in handle.keys()}
    dtypes = {"BF16": "bfloat16", "F32": "float32"}
    official = {layer_pattern(k): dtype for k, dtype in official_tsv(shared_dir).items()}
    ours = {layer_pattern(k): dtypes[dtype] for k, dtype in written.items()}
    assert set(ours) == set(official), (sorted(set(ours) - set(official))[:5], sorted(set(official) - set(ours))[:5])
    assert ours == official

    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    for load in (MiniCPMOForConditionalGeneration.from_pretrained, AutoModel.from_pretrained):
        loaded, info = load(folder, dtype=torch.bfloat16, output_loading_info=True)
        assert type(loaded) is MiniCPMOForConditionalGeneration
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        with torch.no_grad():
            assert torch.equal(loaded.eval()(input_ids=IDS).logits, expected)


def test_export_from_a_checkpoint_writes_the_official_config(saved, shared_dir, tmp_path):
    _, folder = saved
    out = tmp_path / "exported"
    export_main(["--from", str(folder), str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MiniCPMO"]
    assert config["auto_map"]["AutoConfig"] == official_config_json(shared_dir)["auto_map"]["AutoConfig"]
    with safe_open(str(out / "model.safetensors"), "pt") as exported, safe_open(
        str(folder / "model.safetensors"), "pt"
    ) as source:
        assert set(exported.keys()) == set(source.keys())


def test_merged_lora_model_saves_the_official_layout(saved, tmp_path):
    from peft import LoraConfig, get_peft_model

    _, folder = saved
    base = MiniCPMOForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16)
    q_proj = r"model\.language_model\.layers\.\d+\.self_attn\.q_proj"
    lora = LoraConfig(r=4, target_modules=q_proj, init_lora_weights=False)
    merged = get_peft_model(base, lora).merge_and_unload()
    merged.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["MiniCPMO"]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as out, safe_open(
        str(folder / "model.safetensors"), "pt"
    ) as source:
        assert set(out.keys()) == set(source.keys())
        name = "llm.model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(out.get_tensor(name), source.get_tensor(name))  # the merged weights were written
