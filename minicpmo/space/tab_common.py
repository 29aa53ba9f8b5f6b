"""What every tab of the Space shares: user-facing error wrapping, speech output values, voice controls."""

import functools
import inspect

import gradio as gr
import numpy as np

from minicpmo.audio_utils import OUTPUT_SAMPLE_RATE
from minicpmo.processing.duplex_layout_minicpmo import DEFAULT_DUPLEX_SYSTEM_TEXT
from minicpmo.voices import DEFAULT_VOICE

from .audio_io import to_int16
from .chat_handlers import MODEL_VOICE_CHOICE, voice_choices

SPEECH_RATE = OUTPUT_SAMPLE_RATE
DUPLEX_SYSTEM_PROMPT = DEFAULT_DUPLEX_SYSTEM_TEXT
USER_ERRORS = (ValueError, TypeError, RuntimeError, OSError)


def shown_to_user(fn):
    """Turn a handler's expected failures into gr.Error, which reaches only the caller (also for generators)."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except USER_ERRORS as error:
                raise gr.Error(f"{type(error).__name__}: {error}") from error
        return generator_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except USER_ERRORS as error:
            raise gr.Error(f"{type(error).__name__}: {error}") from error
    return wrapper


def speech_value(audio: np.ndarray | None):
    """A streaming-audio chunk (int16 at 24 kHz) or a no-op update when there is nothing to play."""
    if audio is None or audio.size == 0:
        return gr.skip()
    return (SPEECH_RATE, to_int16(audio))


def voice_controls(model_voice: str | None, label_suffix: str = ""):
    default = MODEL_VOICE_CHOICE if model_voice else DEFAULT_VOICE
    voice = gr.Dropdown(voice_choices(model_voice), value=default, label=f"Voice{label_suffix}")
    upload = gr.Audio(label="…or clone a voice (upload / record ≥ 1 s)", sources=["upload", "microphone"],
                      type="filepath")
    return voice, upload
