"""The packaged MiniCPM-o tokenizer: size, official ids, special-token helper, packaged config."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from minicpmo.processing.chat_template_minicpmo import CHAT_TEMPLATE  # noqa: E402
from minicpmo.processing.tokenization_minicpmo import (  # noqa: E402
    TOKENIZER_FILES_DIR,
    MiniCPMOSpecialTokens,
    MissingSpecialTokenError,
    load_bad_token_ids,
    load_minicpmo_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_minicpmo_tokenizer()


def test_vocabulary_size_and_special_tokens(tokenizer):
    assert len(tokenizer) == 151748
    assert tokenizer.unk_token == "<unk>" and tokenizer.unk_token_id == 128244
    assert tokenizer.pad_token_id == 151643
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.eos_token == "<|im_end|>"


@pytest.mark.parametrize(
    "token, token_id",
    [
        ("<unk>", 128244), ("<|endoftext|>", 151643), ("<|im_start|>", 151644), ("<|im_end|>", 151645),
        ("<think>", 151667), ("</think>", 151668), ("<image>", 151669), ("</image>", 151670),
        ("<slice>", 151679), ("</slice>", 151680), ("<image_id>", 151681), ("</image_id>", 151682),
        ("<unit>", 151683), ("</unit>", 151684), ("<|audio_start|>", 151697), ("<|audio_end|>", 151699),
        ("<|tts_bos|>", 151703), ("<|tts_eos|>", 151704), ("<|listen|>", 151705), ("<|speak|>", 151706),
        ("<|turn_eos|>", 151717), ("<|chunk_eos|>", 151718), ("<|chunk_tts_eos|>", 151721),
        ("<|tts_pad|>", 151722), ("<|timbre_31|>", 151747),
    ],
)
def test_official_token_ids(tokenizer, token, token_id):
    assert tokenizer.convert_tokens_to_ids(token) == token_id
    assert tokenizer.encode(token, add_special_tokens=False) == [token_id]


def test_official_prompt_ids(tokenizer):
    prompt = "<|im_start|>user\nDescribe.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = tokenizer(prompt)["input_ids"]
    assert ids == [151644, 872, 198, 74785, 13, 151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271]
    assert tokenizer.decode(ids) == prompt


def test_unk_runs_are_one_token_each(tokenizer):
    ids = tokenizer("<image>" + "<unk>" * 64 + "</image>", add_special_tokens=False)["input_ids"]
    assert ids == [151669] + [128244] * 64 + [151670]


def test_special_tokens_helper_matches_tokenizer(tokenizer):
    resolved = MiniCPMOSpecialTokens.from_tokenizer(tokenizer)
    assert resolved == MiniCPMOSpecialTokens()
    assert resolved.listen == 151705 and resolved.unit_start == 151683 and resolved.chunk_eos == 151718
    assert resolved.terminators == (151645, 151643)
    assert MiniCPMOSpecialTokens.token_string("tts_bos") == "<|tts_bos|>"
    assert set(resolved.as_dict()) >= {"unk", "image_start", "audio_end", "tts_pad", "im_start", "endoftext"}


def test_special_tokens_helper_rejects_foreign_tokenizer():
    class ForeignTokenizer:
        unk_token_id = 0

        def convert_tokens_to_ids(self, token):
            return 0  # everything unknown

    with pytest.raises(MissingSpecialTokenError, match="<|endoftext|>|special token"):
        MiniCPMOSpecialTokens.from_tokenizer(ForeignTokenizer())


def test_packaged_tokenizer_config():
    with open(os.path.join(TOKENIZER_FILES_DIR, "tokenizer_config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    assert "auto_map" not in config
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert config["chat_template"] == CHAT_TEMPLATE
    bad_ids = load_bad_token_ids()
    assert len(bad_ids) == 6965 and bad_ids[:2] == [7, 8]
    for name in ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(TOKENIZER_FILES_DIR, name))


def test_load_from_explicit_path_gives_same_tokenizer(tokenizer):
    other = load_minicpmo_tokenizer(TOKENIZER_FILES_DIR)
    text = "Hello <|listen|> world <unit>"
    assert other(text)["input_ids"] == tokenizer(text)["input_ids"]
