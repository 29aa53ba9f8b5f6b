"""Which model the Space serves: `--model DIR|hub-id`, else $MINICPMO_MODEL, else the embedded default.

The embedded default is the demo checkpoint in minicpmo/assets/demo_model/ (trained here on the synthetic world,
`python -m finetune.demo`), or the tiny random model (seed 0) if that folder is missing, so the Space always
starts, also offline and on CPU. A model folder may carry `voice.wav`, the voice it was trained to speak with; it
then becomes the default voice of the voice menus.
"""

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minicpmo import MiniCPMOForConditionalGeneration, MiniCPMOProcessor, tiny_config
from minicpmo.voices import MODEL_VOICE_FILE

DEMO_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "demo_model"
MODEL_ENV_VAR = "MINICPMO_MODEL"


@dataclass
class LoadedModel:
    """A model, its processor and the one lock every model call of the Space takes (torch inference on one
    model from several request threads is serialised here)."""

    model: object
    processor: object
    name: str
    lock: threading.RLock = field(default_factory=threading.RLock)
    model_voice: str | None = None  # the model's own voice reference (`voice.wav` in its folder), if it has one


def pick_device_and_dtype() -> tuple[str, torch.dtype]:
    """cuda + bf16 when a GPU is present, else cpu + fp32."""
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16
    return "cpu", torch.float32


def load_pretrained(name_or_path: str | os.PathLike) -> LoadedModel:
    """A saved folder or a hub id (needs network unless cached)."""
    device, dtype = pick_device_and_dtype()
    model = MiniCPMOForConditionalGeneration.from_pretrained(str(name_or_path), dtype=dtype).to(device).eval()
    processor = MiniCPMOProcessor.from_pretrained(str(name_or_path))
    model_voice = Path(name_or_path) / MODEL_VOICE_FILE
    return LoadedModel(model=model, processor=processor, name=str(name_or_path),
                       model_voice=str(model_voice) if model_voice.is_file() else None)


def load_default_model() -> LoadedModel:
    """The embedded default model (see module docstring); deterministic across runs."""
    if (DEMO_MODEL_DIR / "config.json").is_file():
        return load_pretrained(DEMO_MODEL_DIR)
    return load_tiny_model()


def load_tiny_model() -> LoadedModel:
    """The tiny random model (seed 0): untrained, for wiring checks; the fallback default."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MiniCPMOForConditionalGeneration(tiny_config()).eval()
    return LoadedModel(model=model, processor=MiniCPMOProcessor.from_defaults(),
                       name="tiny random model (seed 0; untrained, for wiring only)")


def load_model(name_or_path: str | None = None) -> LoadedModel:
    """`name_or_path` (the --model flag) wins over $MINICPMO_MODEL; neither -> load_default_model()."""
    chosen = name_or_path or os.environ.get(MODEL_ENV_VAR) or None
    if chosen is None:
        return load_default_model()
    return load_pretrained(chosen)
