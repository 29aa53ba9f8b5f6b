"""The official MiniCPM-o 4.5 folder loads as downloaded: processor, tokenizer and model, no remote code.

The official processor files (../shared/tokenizer/, unedited) name `MiniCPMOTokenizerFast` with an `auto_map` to
remote code in tokenizer_config.json and an `auto_map` + `processor_class` in preprocessor_config.json; the official
config.json has `"architectures": ["MiniCPMO"]` and an `auto_map` to `modeling_minicpmo.MiniCPMO`.
"""

import hashlib
import json
import shutil

import pytest
import torch
from transformers import AutoModel, AutoProcessor, AutoTokenizer, Qwen2Tokenizer

import minicpmo  # noqa: F401  (registers the Auto classes)
from minicpmo import MiniCPMOForConditionalGeneration, MiniCPMOProcessor
from minicpmo.processing.tokenization_minicpmo import TOKENIZER_FILES_DIR, MiniCPMOTokenizerFast

from helpers import tiny_model

OFFICIAL_MODEL_AUTO_MAP = {
    "AutoConfig": "configuration_minicpmo.MiniCPMOConfig",
    "AutoModel": "modeling_minicpmo.MiniCPMO",
    "AutoModelForCausalLM": "modeling_minicpmo.MiniCPMO",
}
SAMPLES = [
    "<|im_start|>user\nDescribe the picture.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    "<unit><image><unk><unk></image><|audio_start|><unk><|audio_end|><|speak|>Hello there!<|chunk_eos|></unit>",
    "héllo 世界 \n\n  tabs\tand  spaces <|tts_bos|>spoken<|tts_eos|><|im_end|>",
]


def _digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def official_folder(shared_dir, tmp_path_factory):
    """A copy of the official processor files, untouched, plus a tiny model saved in the official config layout."""
    folder = tmp_path_factory.mktemp("official")
    tiny_model().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["MiniCPMO"], auto_map=OFFICIAL_MODEL_AUTO_MAP, version="4.5")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for source in (shared_dir / "tokenizer").iterdir():
        if source.name != "README.md":
            shutil.copy(source, folder / source.name)
    return folder


def test_the_copied_files_are_the_official_ones(official_folder, shared_dir):
    tokenizer_config = json.loads((official_folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "MiniCPMOTokenizerFast" and "auto_map" in tokenizer_config
    preprocessor = json.loads((official_folder / "preprocessor_config.json").read_text())
    assert "auto_map" in preprocessor and preprocessor["processor_class"] == "MiniCPMOProcessor"
    for name in ("tokenizer_config.json", "preprocessor_config.json", "vocab.json", "merges.txt"):
        assert (official_folder / name).read_bytes() == (shared_dir / "tokenizer" / name).read_bytes()


@pytest.mark.parametrize("loader", ["processor", "auto_processor"])
def test_processor_loads_the_official_folder_with_the_bundled_ids(official_folder, loader):
    before = _digest(official_folder)
    load = MiniCPMOProcessor.from_pretrained if loader == "processor" else AutoProcessor.from_pretrained
    processor = load(official_folder)
    assert isinstance(processor, MiniCPMOProcessor)
    assert isinstance(processor.tokenizer, MiniCPMOTokenizerFast)
    assert len(processor.tokenizer) == 151748 and len(processor.tokenizer.bad_token_ids) == 6965
    assert processor.image_processor.max_slice_nums == 9 and processor.image_processor.use_image_id
    bundled = Qwen2Tokenizer.from_pretrained(TOKENIZER_FILES_DIR)
    for text in SAMPLES:
        assert processor.tokenizer(text)["input_ids"] == bundled(text)["input_ids"]
    assert processor.tokenizer.convert_tokens_to_ids(["<unk>", "<unit>", "<|listen|>", "<|chunk_eos|>"]) == [
        128244, 151683, 151705, 151718]
    assert _digest(official_folder) == before, "loading rewrote a file of the official folder"


def test_processor_loading_never_asks_autotokenizer(official_folder, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("AutoTokenizer was called")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)
    assert isinstance(MiniCPMOProcessor.from_pretrained(official_folder).tokenizer, MiniCPMOTokenizerFast)


def test_auto_tokenizer_resolves_the_official_class_name_locally(official_folder):
    tokenizer = AutoTokenizer.from_pretrained(official_folder)
    assert isinstance(tokenizer, MiniCPMOTokenizerFast)


def test_auto_model_uses_this_package_without_remote_code(official_folder):
    before = _digest(official_folder)
    model = AutoModel.from_pretrained(official_folder)
    assert type(model) is MiniCPMOForConditionalGeneration
    ids = torch.tensor([[151644, 872, 198, 9707]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, tiny_model()(input_ids=ids).logits)
    assert _digest(official_folder) == before


def test_official_tokenizer_saves_without_the_remote_code_map(official_folder, tmp_path):
    tokenizer = MiniCPMOTokenizerFast.from_pretrained(official_folder)
    tokenizer.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "auto_map" not in saved
    assert saved["bad_token_ids"] == tokenizer.bad_token_ids
    assert MiniCPMOTokenizerFast.from_pretrained(tmp_path)(SAMPLES[0])["input_ids"] == tokenizer(SAMPLES[0])["input_ids"]
