"""The Gradio Space: turn-based omni chat, live full duplex (webcam + microphone) and duplex replay.

`python app.py` (repository root) builds the demo with `build_demo(load_model(None))`; the pieces live in small
modules: settings, model_loading, audio_io, chat_handlers, live_sessions, live_view, replay_handler, ui.
"""

from .model_loading import LoadedModel, load_default_model, load_model
from .settings import SpaceSettings
from .ui import build_demo

__all__ = ["LoadedModel", "SpaceSettings", "build_demo", "load_default_model", "load_model"]
