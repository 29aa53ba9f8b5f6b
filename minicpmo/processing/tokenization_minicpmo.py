"""MiniCPM-o 4.5 tokenizer: the Qwen3 vocabulary plus 105 added tokens (151,748 in total).

`MiniCPMOTokenizerFast` carries the official class name, so the official `tokenizer_config.json`
(`"tokenizer_class": "MiniCPMOTokenizerFast"` with an `auto_map` to remote code) loads with this class as it is:
it is transformers' fast `Qwen2Tokenizer` plus the official `bad_token_ids`. Loading goes through the class itself,
never through `AutoTokenizer`, so the folder's `auto_map` is not consulted and no remote code is asked for.
Special ids are resolved by name with `MiniCPMOSpecialTokens`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields

from transformers import PreTrainedTokenizerBase, Qwen2Tokenizer

from ..errors import CheckpointError


TOKENIZER_FILES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer_files")
EXPECTED_VOCAB_SIZE = 151748


class MissingSpecialTokenError(CheckpointError):
    """The tokenizer lacks one of the MiniCPM-o special tokens (it is not the MiniCPM-o vocabulary)."""


class MiniCPMOTokenizerFast(Qwen2Tokenizer):
    """The official MiniCPM-o tokenizer class: Qwen2's fast BPE tokenizer plus `bad_token_ids`.

    `bad_token_ids` (6965 ids in the official config) are the ids the duplex loop must never emit.
    """

    def __init__(self, *args, bad_token_ids: list[int] | None = None, **kwargs):
        kwargs.pop("auto_map", None)  # points at the official remote code, which this class replaces
        super().__init__(*args, **kwargs)
        self.bad_token_ids = [int(token) for token in (bad_token_ids or [])]
        self.init_kwargs["bad_token_ids"] = list(self.bad_token_ids)
        self.init_kwargs.pop("auto_map", None)


def load_minicpmo_tokenizer(path: str | os.PathLike | None = None, **kwargs) -> MiniCPMOTokenizerFast:
    """Load the fast MiniCPM-o tokenizer; `path=None`, or a local model folder saved without tokenizer files (the
    bundled demo model, which keeps 10 MB out of the repository), uses the files shipped inside this package."""
    folder = TOKENIZER_FILES_DIR if path is None or _lacks_tokenizer_files(path) else os.fspath(path)
    kwargs.pop("trust_remote_code", None)
    return MiniCPMOTokenizerFast.from_pretrained(folder, **kwargs)


def _lacks_tokenizer_files(path: str | os.PathLike) -> bool:
    folder = os.fspath(path)
    names = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
    return os.path.isdir(folder) and not any(os.path.isfile(os.path.join(folder, name)) for name in names)


def load_bad_token_ids(path: str | os.PathLike | None = None) -> list[int]:
    """The official `bad_token_ids` (6965 ids the model must never emit), read from tokenizer_config.json."""
    folder = TOKENIZER_FILES_DIR if path is None else os.fspath(path)
    with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as handle:
        return list(json.load(handle).get("bad_token_ids", []))


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
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> "MiniCPMOSpecialTokens":
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
