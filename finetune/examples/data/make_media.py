"""Regenerate the tiny example media (deterministic; no network): `python finetune/examples/data/make_media.py`.

shapes.png: a red square and a blue disc; tone.wav: 1 s of 440 Hz at 16 kHz; chirp.wav: a 2 s rising chirp at
8 kHz (exercises resampling on load); frame_0.png / frame_1.png: two video frames (a square moving right).
"""

from pathlib import Path

import numpy as np
import soundfile
from PIL import Image, ImageDraw

MEDIA = Path(__file__).resolve().parent / "media"


def draw_shapes(path: Path) -> None:
    image = Image.new("RGB", (96, 64), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((8, 16, 40, 48), fill=(220, 30, 30))
    draw.ellipse((56, 16, 88, 48), fill=(30, 60, 220))
    image.save(path, optimize=True)


def draw_frame(path: Path, x: int) -> None:
    image = Image.new("RGB", (64, 64), (240, 240, 200))
    ImageDraw.Draw(image).rectangle((x, 24, x + 16, 40), fill=(20, 140, 40))
    image.save(path, optimize=True)


def main() -> None:
    MEDIA.mkdir(parents=True, exist_ok=True)
    draw_shapes(MEDIA / "shapes.png")
    draw_frame(MEDIA / "frame_0.png", 8)
    draw_frame(MEDIA / "frame_1.png", 40)
    t = np.arange(16000) / 16000
    soundfile.write(MEDIA / "tone.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000, "PCM_16")
    t = np.arange(16000) / 8000
    chirp = 0.3 * np.sin(2 * np.pi * (200 * t + 300 * t**2))
    soundfile.write(MEDIA / "chirp.wav", chirp.astype(np.float32), 8000, "PCM_16")


if __name__ == "__main__":
    main()
