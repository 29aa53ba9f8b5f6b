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
from transformers import Qwen2Tokenizer

from ..special_tokens import MiniCPMOSpecialTokens, MissingSpecialTokenError  # noqa: F401 (re-exported)


TOKENIZER_FILES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer_files")
EXPECTED_VOCAB_SIZE = 151748


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
