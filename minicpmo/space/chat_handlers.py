"""Turn-based omni chat for the Space: message building, voice choice and lock-guarded streaming generation.

The model is shared by every user, so each step of the chat iterator runs under the global model lock; other
users' chats and live sessions interleave between chunks instead of waiting for a whole answer.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from minicpmo.audio_utils import INPUT_SAMPLE_RATE
from minicpmo.chat_prompts import system_message
from minicpmo.errors import SpaceError
from minicpmo.modeling.modeling_speech_decoder import SpeechSamplingConfig
from minicpmo.modeling.modeling_speech_output import ChatChunk
from minicpmo.processing.media_loading_minicpmo import load_audio, load_image
from minicpmo.voices import BUNDLED_VOICES, DEFAULT_VOICE, load_voice, read_audio_16k

from .model_loading import LoadedModel
from .settings import SpaceSettings



class ChatInputError(SpaceError):
    """The user's message or voice cannot be used (empty message, unreadable file ...)."""


MODEL_VOICE_CHOICE = "model voice"


def voice_choices(model_voice: str | None = None) -> list[str]:
    """Bundled voice names, plus "model voice" first when the model ships its own reference (`voice.wav`)."""
    return ([MODEL_VOICE_CHOICE] if model_voice else []) + sorted(BUNDLED_VOICES)


def resolve_voice(voice_name: str | None, voice_upload: str | None, model_voice: str | None = None) -> np.ndarray:
    """An uploaded reference clip wins over the chosen voice ("model voice" = the model's `voice.wav`);
    16 kHz mono float32."""
    if voice_upload:
        try:
            voice = read_audio_16k(voice_upload)
        except Exception as error:  # soundfile raises several types for broken files
            raise ChatInputError(f"cannot read the uploaded voice file: {error}") from error
        if voice.shape[0] < INPUT_SAMPLE_RATE:
            raise ChatInputError(
                f"the uploaded voice is {voice.shape[0] / INPUT_SAMPLE_RATE:.2f} s long; give at least 1 s"
            )
        return voice
    if voice_name == MODEL_VOICE_CHOICE:
        if not model_voice:
            raise ChatInputError("this model ships no voice of its own; pick a bundled voice or upload one")
        return load_voice(model_voice)
    return load_voice(voice_name or DEFAULT_VOICE)


def user_content(text: str | None, image: str | None = None, audio: str | None = None,
                 video: str | None = None) -> list[dict]:
    """Content items of one user turn; media files are read now so a broken file fails before generation."""
    items = []
    if image:
        try:
            items.append({"type": "image", "image": load_image(image)})
        except Exception as error:
            raise ChatInputError(f"cannot read the image: {error}") from error
    if video:
        items.append({"type": "video", "video": str(video)})
    if audio:
        try:
            items.append({"type": "audio", "audio": load_audio(audio)})
        except Exception as error:
            raise ChatInputError(f"cannot read the audio file: {error}") from error
    if text and text.strip():
        items.append({"type": "text", "text": text.strip()})
    if not items:
        raise ChatInputError("the message is empty: type text or add an image, audio or video")
    return items


def describe_turn(text: str | None, image=None, audio=None, video=None) -> str:
    """What the chat window shows for a user turn."""
    marks = [name for name, value in (("🖼 image", image), ("🎞 video", video), ("🔊 audio", audio)) if value]
    return " ".join(marks + [text.strip()] if text and text.strip() else marks)


@dataclass
class ChatRequest:
    history: list  # earlier user/assistant messages (model format)
    content: list  # this user turn's content items
    ref_audio: np.ndarray | None
    generate_audio: bool
    enable_thinking: bool


class ChatService:
    """Runs chats on the shared model; every model call holds `loaded.lock`."""

    def __init__(self, loaded: LoadedModel, settings: SpaceSettings):
        self.loaded = loaded
        self.settings = settings

    def _speech_sampling(self) -> SpeechSamplingConfig | None:
        cap = self.settings.chat_max_speech_codes
        if cap is None:
            return None
        return SpeechSamplingConfig(min_new_codes=min(50, cap), max_new_codes=cap)

    def stream(self, request: ChatRequest) -> Iterator[ChatChunk]:
        speak = request.generate_audio and request.ref_audio is not None
        msgs = [system_message(request.ref_audio if speak else None), *request.history,
                {"role": "user", "content": request.content}]
        extra = {}
        if speak and self.settings.chat_max_speech_codes is not None:
            extra["max_codes_per_chunk"] = self.settings.chat_max_speech_codes
        with self.loaded.lock:
            chunks = self.loaded.model.chat(
                msgs, processor=self.loaded.processor, generate_audio=speak, stream=True,
                ref_audio=request.ref_audio if speak else None, enable_thinking=request.enable_thinking,
                max_new_tokens=self.settings.chat_max_new_tokens, speech_sampling=self._speech_sampling(), **extra,
            )
        while True:
            with self.loaded.lock:
                chunk = next(chunks, None)
            if chunk is None:
                return
            yield chunk

    def respond(self, request: ChatRequest) -> tuple[str, np.ndarray]:
        """Whole answer: (text, 24 kHz float32 speech, empty when speech is off)."""
        text, audio = [], []
        for chunk in self.stream(request):
            text.append(chunk.text)
            if chunk.audio is not None and chunk.audio.size:
                audio.append(chunk.audio)
        return "".join(text), np.concatenate(audio) if audio else np.zeros(0, dtype=np.float32)
