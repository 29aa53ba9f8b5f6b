"""System turns of turn-based chat, shared by the Space and by training data so both see the same prompt."""

from __future__ import annotations

VOICE_CLONE_PROMPT = ("Clone the voice in the provided audio prompt.",
                      "As an assistant, you will speak using this voice style.")
TEXT_SYSTEM_PROMPT = "You are a helpful assistant. You can accept audio and text input and output voice and text."


def system_message(ref_audio=None) -> dict:
    """The official voice-cloning system turn (text, reference audio, text) when `ref_audio` (a waveform or a
    path) is given, else a text-only one."""
    if ref_audio is None:
        return {"role": "system", "content": [{"type": "text", "text": TEXT_SYSTEM_PROMPT}]}
    return {"role": "system", "content": [{"type": "text", "text": VOICE_CLONE_PROMPT[0]},
                                          {"type": "audio", "audio": ref_audio},
                                          {"type": "text", "text": VOICE_CLONE_PROMPT[1]}]}


__all__ = ["TEXT_SYSTEM_PROMPT", "VOICE_CLONE_PROMPT", "system_message"]
