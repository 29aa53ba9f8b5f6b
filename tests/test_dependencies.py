"""Dependencies by use: the model, processor and duplex session import none of the Space/training/eval stacks."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL_STACKS = ("gradio", "trl", "peft", "datasets", "matplotlib", "faster_whisper", "ctranslate2", "jiwer",
                   "fastapi", "uvicorn", "websockets", "ray")
# torchao (the [quant] extra) is not in the list: transformers' quantizers/auto.py imports it with every model
# import whenever it is installed, so that is transformers' import, not ours.

USE_THE_MODEL = r"""
import sys, torch
import minicpmo
from minicpmo import MiniCPMOForConditionalGeneration, MiniCPMOProcessor, tiny_config
from minicpmo.duplex import DuplexConfig
import minicpmo.duplex.evaluate, minicpmo.duplex.replay, minicpmo.duplex.engine, minicpmo.export
torch.manual_seed(0)
model = MiniCPMOForConditionalGeneration(tiny_config()).eval()
processor = MiniCPMOProcessor.from_defaults()
inputs = processor.apply_chat_template(
    [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
)
model.generate(**inputs, max_new_tokens=2, do_sample=False)
print("imported:" + ",".join(name for name in %r if name in sys.modules))
"""


def test_model_processor_and_duplex_import_no_optional_stack():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", USE_THE_MODEL % (OPTIONAL_STACKS,)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "imported:", f"optional stacks were imported: {result.stdout}"


def test_optional_stacks_live_in_extras_and_dev_installs_them_all():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    for name in OPTIONAL_STACKS + ("evaluate",):
        assert name not in core, f"{name} is a core dependency"
    extras = project["optional-dependencies"]
    assert extras["space"] == ["gradio==6.31.0"]
    assert {"peft", "trl", "datasets"} <= {req.split("=")[0] for req in extras["train"]}
    assert {"fastapi", "uvicorn", "websockets"} <= {req.split("=")[0].split(">")[0] for req in extras["serve"]}
    assert extras["quant"] == ["torchao==0.18.0", "bitsandbytes==0.50.2"]
    assert extras["ray"] == ["minicpmo[serve]", "ray[serve]==2.60.0"]
    assert "minicpmo[space,serve,ray,train,eval,quant]" in extras["dev"]
    assert (ROOT / "requirements.txt").read_text().strip().splitlines()[-1] == ".[space]"
