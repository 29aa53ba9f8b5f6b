"""Small builders shared by the tests (tiny random model, synthetic images and audio)."""

import functools

import numpy as np
import torch
from PIL import Image


@functools.lru_cache(maxsize=None)
def tiny_model(seed: int = 0, attn_implementation: str | None = None):
    from minicpmo import MiniCPMOForConditionalGeneration, tiny_config

    torch.manual_seed(seed)
    config = tiny_config()
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return MiniCPMOForConditionalGeneration(config).eval()


@functools.lru_cache(maxsize=None)
def processor():
    from minicpmo import MiniCPMOProcessor

    return MiniCPMOProcessor.from_defaults()


def image(width: int = 448, height: int = 448, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8))


def tone(seconds: float = 1.0, freq: float = 440.0, sample_rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
