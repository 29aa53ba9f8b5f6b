"""`python -m minicpmo.export` writes a flat folder that loads with trust_remote_code without the package."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import image, tone

from minicpmo.export import flatten_imports

LOAD_WITHOUT_PACKAGE = textwrap.dedent(
    """
    import sys
    sys.modules["minicpmo"] = None  # the package must not be importable here
    import json, numpy as np, torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    folder, inputs_path, out_path = sys.argv[1:4]
    DUPLEX_CONTROLS = dict(generate_audio=False, force_listen_count=0, listen_bias=-1e9, max_speak_tokens_per_unit=4)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert "minicpmo" not in type(model).__module__.split(".")[0]
    media = torch.load(inputs_path)
    inputs = processor(text=[media["text"]], images=[[Image.fromarray(media["image"].numpy())]],
                       audio=[[media["audio"].numpy()]], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert model.token2wav_weights_loaded
    voice = model.prepare_voice(media["audio"].numpy())
    torch.manual_seed(0)
    wav = model.token2wav.synthesize(torch.arange(100, 160), voice)
    session = model.duplex_session(processor, **DUPLEX_CONTROLS)  # the flat duplex session files came along
    duplex = [session.step(media["audio"].numpy()[:16000]).token_ids for _ in range(2)]
    torch.save({"logits": logits, "input_ids": inputs["input_ids"], "module": type(model).__module__,
                "wav": wav, "duplex": duplex}, out_path)
    """
)


def test_flatten_imports_rewrites_package_relative_imports():
    source = "from ..configuration.configuration_minicpmo import A\nfrom .modeling_audio import B\nimport torch\n"
    assert flatten_imports(source) == (
        "from .configuration_minicpmo import A\nfrom .modeling_audio import B\nimport torch\n"
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("hub") / "tiny-minicpmo.export"
    subprocess.run([sys.executable, "-m", "minicpmo.export", "--tiny", str(out)], check=True)
    return out


def test_folder_is_flat_and_has_auto_maps(exported):
    # Code and weights are flat; token2wav weights (separate files in the official release) sit in token2wav/.
    assert [p.name for p in exported.iterdir() if p.is_dir()] == ["token2wav"]
    assert sorted(p.name for p in (exported / "token2wav").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((exported / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_minicpmo.MiniCPMOForConditionalGeneration"
    assert config["model_type"] == "minicpmo"
    for path in exported.glob("*.py"):
        text = path.read_text()
        assert "from .." not in text and "import minicpmo" not in text, path.name
    processor_config = json.loads((exported / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_minicpmo.MiniCPMOProcessor"


def test_trust_remote_code_load_matches_in_package_model(exported, tmp_path):
    from minicpmo import MiniCPMOForConditionalGeneration, MiniCPMOProcessor

    text = "<|im_start|>user\n<image>./</image>\n<audio>./</audio>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
    picture = image(500, 300)
    audio = tone(1.5)
    torch.save(
        {"text": text, "image": torch.from_numpy(np.asarray(picture).copy()), "audio": torch.from_numpy(audio)},
        tmp_path / "in.pt",
    )

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PACKAGE, str(exported), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        check=True, cwd=tmp_path, env=env,
    )
    remote = torch.load(tmp_path / "out.pt")
    assert remote["module"].startswith("transformers_modules.")

    model = MiniCPMOForConditionalGeneration.from_pretrained(exported).eval()
    processor = MiniCPMOProcessor.from_pretrained(exported)
    inputs = processor(text=[text], images=[[picture]], audio=[[audio]], return_tensors="pt")
    assert torch.equal(inputs["input_ids"], remote["input_ids"])
    with torch.no_grad():
        local = model(**inputs).logits
    torch.testing.assert_close(remote["logits"], local, rtol=0, atol=0)
    torch.manual_seed(0)
    local_wav = model.token2wav.synthesize(torch.arange(100, 160), model.prepare_voice(audio))
    torch.testing.assert_close(remote["wav"], local_wav, rtol=0, atol=0)
    session = model.duplex_session(processor, generate_audio=False, force_listen_count=0, listen_bias=-1e9,
                                   max_speak_tokens_per_unit=4)
    local_duplex = [session.step(audio[:16000]).token_ids for _ in range(2)]
    assert remote["duplex"] == local_duplex and len(local_duplex[0]) == 4  # speaking units, decoded the same


def test_reexport_from_checkpoint_keeps_weights(exported, tmp_path):
    from minicpmo import MiniCPMOForConditionalGeneration

    again = tmp_path / "again"
    subprocess.run([sys.executable, "-m", "minicpmo.export", "--from", str(exported), str(again)], check=True)
    first_model = MiniCPMOForConditionalGeneration.from_pretrained(exported)
    second_model = MiniCPMOForConditionalGeneration.from_pretrained(again)
    assert first_model.token2wav_weights_loaded and second_model.token2wav_weights_loaded
    first, second = first_model.state_dict(), second_model.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
