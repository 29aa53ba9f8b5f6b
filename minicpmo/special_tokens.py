"""The one table of MiniCPM-o 4.5's special tokens and the label constants, in a leaf module.

Token strings and their ids in the one MiniCPM-o vocabulary (official values; `MiniCPMOSpecialTokens.from_tokenizer`
resolves them by name so a different vocabulary fails loudly instead of shifting ids). The tokenizer, the duplex
layout, the model and the collators all read ids from here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import CheckpointError

IGNORE_INDEX = -100  # label of positions that are not trained (transformers' cross-entropy default)
SPEECH_CODEBOOK_SIZE = 6561  # S3 speech codes 0..6560; the speech decoder's 6562nd row is its end of speech


class MissingSpecialTokenError(CheckpointError):
    """The tokenizer lacks one of the MiniCPM-o special tokens (it is not the MiniCPM-o vocabulary)."""


# field name -> token string; the model and processor look ids up through these names only.
_SPECIAL_TOKEN_STRINGS = {
    "unk": "<unk>",
    "endoftext": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "think_start": "<think>",
    "think_end": "</think>",
    "image_start": "<image>",
    "image_end": "</image>",
    "slice_start": "<slice>",
    "slice_end": "</slice>",
    "image_id_start": "<image_id>",
    "image_id_end": "</image_id>",
    "unit_start": "<unit>",
    "unit_end": "</unit>",
    "audio_start": "<|audio_start|>",
    "audio_end": "<|audio_end|>",
    "spk_bos": "<|spk_bos|>",
    "spk_eos": "<|spk_eos|>",
    "tts_bos": "<|tts_bos|>",
    "tts_eos": "<|tts_eos|>",
    "listen": "<|listen|>",
    "speak": "<|speak|>",
    "turn_eos": "<|turn_eos|>",
    "chunk_eos": "<|chunk_eos|>",
    "chunk_tts_eos": "<|chunk_tts_eos|>",
    "tts_pad": "<|tts_pad|>",
}


@dataclass(frozen=True)
class MiniCPMOSpecialTokens:
    """Ids of the MiniCPM-o special tokens, resolved by name from a tokenizer (official values as defaults)."""

    unk: int = 128244
    endoftext: int = 151643
    im_start: int = 151644
    im_end: int = 151645
    think_start: int = 151667
    think_end: int = 151668
    image_start: int = 151669
    image_end: int = 151670
    slice_start: int = 151679
    slice_end: int = 151680
    image_id_start: int = 151681
    image_id_end: int = 151682
    unit_start: int = 151683
    unit_end: int = 151684
    audio_start: int = 151697
    audio_end: int = 151699
    spk_bos: int = 151700
    spk_eos: int = 151702
    tts_bos: int = 151703
    tts_eos: int = 151704
    listen: int = 151705
    speak: int = 151706
    turn_eos: int = 151717
    chunk_eos: int = 151718
    chunk_tts_eos: int = 151721
    tts_pad: int = 151722

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "MiniCPMOSpecialTokens":
        """Resolve every id through the tokenizer so a changed vocabulary cannot silently shift them."""
        ids = {}
        for name, token in _SPECIAL_TOKEN_STRINGS.items():
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or (token_id == tokenizer.unk_token_id and token != "<unk>"):
                raise MissingSpecialTokenError(
                    f"tokenizer has no special token {token!r} ({name}); load the MiniCPM-o tokenizer"
                )
            ids[name] = int(token_id)
        return cls(**ids)

    @staticmethod
    def token_string(name: str) -> str:
        """Token text for a field name, e.g. `token_string("listen") == "<|listen|>"`."""
        return _SPECIAL_TOKEN_STRINGS[name]

    @property
    def terminators(self) -> tuple[int, int]:
        """Ids that end a turn-based generation (`<|im_end|>`, `<|endoftext|>`)."""
        return (self.im_end, self.endoftext)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
