"""MiniCPMOProcessor: chat template strings, placeholder expansion, padding, media loading, errors, save/load."""

import os
import shutil
import subprocess

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from minicpmo.processing.chat_template_minicpmo import (  # noqa: E402
    CHAT_TEMPLATE,
    UnsupportedContentTypeError,
    render_chat_prompt,
)
from minicpmo.processing.feature_extraction_minicpmo import UnsupportedSamplingRateError, audio_token_count  # noqa: E402
from minicpmo.processing.media_loading_minicpmo import MediaLoadingError  # noqa: E402
from minicpmo.processing.processing_minicpmo import (  # noqa: E402
    MiniCPMOProcessor,
    PlaceholderCountMismatchError,
    PromptTooLongError,
)

UNK, IMAGE_START, SLICE_START, AUDIO_START, AUDIO_END, LISTEN, PAD = 128244, 151669, 151679, 151697, 151699, 151705, 151643
GEN = "<|im_start|>assistant\n<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def processor():
    return MiniCPMOProcessor.from_defaults()


def image(width=448, height=448, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def tone(seconds, seed=0):
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)


def groups(ids, start_tokens, end_tokens):
    """Lengths of the `<unk>` runs between a start token and the next end token, in reading order."""
    lengths, current = [], None
    for token in ids:
        if token in start_tokens:
            current = 0
        elif token in end_tokens and current is not None:
            lengths.append(current)
            current = None
        elif current is not None and token == UNK:
            current += 1
    return lengths


def image_groups(ids):
    return groups(ids, {IMAGE_START, SLICE_START}, {151670, 151680})


def audio_groups(ids):
    return groups(ids, {AUDIO_START}, {AUDIO_END})


# ---- chat template strings ------------------------------------------------------------------------------------
CASES = [
    (
        "text",
        [{"role": "user", "content": "Describe."}],
        {},
        "<|im_start|>user\nDescribe.<|im_end|>\n" + GEN,
    ),
    (
        "image",
        [{"role": "user", "content": [{"type": "image", "image": None}, {"type": "text", "text": "What is this?"}]}],
        {},
        "<|im_start|>user\n<image>./</image>\nWhat is this?<|im_end|>\n" + GEN,
    ),
    (
        "audio with system voice and tts",
        [
            {"role": "system", "content": [
                {"type": "text", "text": "Clone the voice in the provided audio prompt."},
                {"type": "audio", "audio": None},
                {"type": "text", "text": "As an assistant, you will speak using this voice style."},
            ]},
            {"role": "user", "content": [{"type": "audio", "audio": None}]},
        ],
        {"use_tts_template": True},
        "<|im_start|>system\nClone the voice in the provided audio prompt.\n<audio>./</audio>\n"
        "As an assistant, you will speak using this voice style.<|im_end|>\n"
        "<|im_start|>user\n<audio>./</audio><|im_end|>\n" + GEN + "<|tts_bos|>",
    ),
    (
        "omni",
        [{"role": "user", "content": [
            {"type": "image", "image": None}, {"type": "audio", "audio": None},
            {"type": "image", "image": None}, {"type": "audio", "audio": None},
            {"type": "text", "text": "What happens?"},
        ]}],
        {"omni_mode": True},
        "<|im_start|>user\n<image>./</image><audio>./</audio><image>./</image><audio>./</audio>What happens?"
        "<|im_end|>\n" + GEN + "<|tts_bos|>",
    ),
    (
        "audio in, explicitly no tts template",
        [{"role": "user", "content": [{"type": "audio", "audio": None}, {"type": "text", "text": "Transcribe."}]}],
        {"use_tts_template": False},
        "<|im_start|>user\n<audio>./</audio>\nTranscribe.<|im_end|>\n" + GEN,
    ),
    (
        "thinking",
        [{"role": "user", "content": "Solve 2+2."}],
        {"enable_thinking": True},
        "<|im_start|>user\nSolve 2+2.<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        "multi-turn with reasoning",
        [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>\nplan\n</think>\n\nHello!"},
            {"role": "user", "content": [{"type": "text", "text": "Again"}]},
        ],
        {},
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nAgain<|im_end|>\n" + GEN,
    ),
]


@pytest.mark.parametrize("name, messages, options, expected", CASES, ids=[case[0] for case in CASES])
def test_prompt_strings_python_and_jinja(processor, name, messages, options, expected):
    assert render_chat_prompt(messages, add_generation_prompt=True, **options) == expected
    assert processor.apply_chat_template(messages, add_generation_prompt=True, **options) == expected


def test_final_assistant_turn_keeps_reasoning(processor):
    messages = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "<think>\nwhy\n</think>\n\nA"},
    ]
    expected = "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\nwhy\n</think>\n\nA<|im_end|>\n"
    assert render_chat_prompt(messages) == expected
    assert processor.apply_chat_template(messages) == expected


def test_template_is_shared_with_tokenizer(processor):
    assert processor.chat_template == CHAT_TEMPLATE == processor.tokenizer.chat_template


def test_unknown_content_type_is_refused(processor):
    messages = [{"role": "user", "content": [{"type": "hologram", "data": 1}]}]
    with pytest.raises(UnsupportedContentTypeError, match="hologram"):
        render_chat_prompt(messages)
    with pytest.raises(UnsupportedContentTypeError, match="hologram"):
        processor.apply_chat_template(messages)


# ---- __call__ ------------------------------------------------------------------------------------------------
def test_image_placeholders_match_pixels(processor):
    text = "<|im_start|>user\n<image>./</image>\nWhat?<|im_end|>\n<|im_start|>assistant\n"
    out = processor(text=text, images=[image(1344, 896)], return_tensors="pt")
    assert set(out) == {"input_ids", "attention_mask", "pixel_values", "tgt_sizes"}
    ids = out["input_ids"][0].tolist()
    assert image_groups(ids) == [64] * 7
    assert out["pixel_values"].dtype == torch.float32 and out["tgt_sizes"].dtype == torch.int64
    assert out["tgt_sizes"].tolist() == [[26, 39]] + [[32, 32]] * 6
    # the thumbnail (26*39 = 1014 patches) is zero padded to the longest slice (32*32 = 1024 patches)
    assert out["pixel_values"].shape[-1] == 1024 * 14
    assert torch.all(out["pixel_values"][0, :, :, 26 * 39 * 14:] == 0)
    decoded = processor.decode(ids)
    assert decoded.startswith("<|im_start|>user\n<image_id>0</image_id><image>")
    assert "</slice>\n<slice>" in decoded and decoded.count("\n<slice>") == 1


def test_use_image_id_and_max_slice_nums(processor):
    text = "<image>./</image><image>./</image>"
    out = processor(text=text, images=[image(1344, 896), image(100, 50)], max_slice_nums=1, use_image_id=True)
    assert out["tgt_sizes"].tolist() == [[26, 39], [23, 45]]
    decoded = processor.decode(out["input_ids"][0])
    assert "<image_id>0</image_id>" in decoded and "<image_id>1</image_id>" in decoded
    no_id = processor(text=text, images=[image(), image()], use_image_id=False)
    assert "<image_id>" not in processor.decode(no_id["input_ids"][0])


def test_audio_placeholders_match_features(processor):
    waves = [tone(1.0), tone(2.5, seed=1)]
    out = processor(text="<audio>./</audio> and <audio>./</audio>", audio=waves, return_tensors="pt")
    assert set(out) == {"input_ids", "attention_mask", "input_features", "input_features_mask"}
    assert audio_groups(out["input_ids"][0].tolist()) == [10, 25]
    assert out["input_features"].shape == (2, 80, 250)
    assert out["input_features_mask"].sum(dim=1).tolist() == [100, 250]


def test_long_audio_gets_one_group_with_all_pieces(processor):
    out = processor(text="<audio>./</audio>", audio=[tone(45.0)], return_tensors="pt")
    assert audio_groups(out["input_ids"][0].tolist()) == [450]
    assert out["input_features"].shape == (2, 80, 3000)
    assert out["input_features_mask"].sum(dim=1).tolist() == [3000, 1500]


def test_batch_left_padding_and_media_order(processor):
    texts = ["<image>./</image>Short", "A much longer prompt <audio>./</audio> with <image>./</image> two media"]
    images = [[image(seed=1)], [image(896, 448, seed=2)]]
    out = processor(text=texts, images=images, audio=[tone(1.0)], return_tensors="pt")
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    lengths = mask.sum(dim=1).tolist()
    shorter = int(np.argmin(lengths))
    pad = ids.shape[1] - lengths[shorter]
    assert pad > 0 and ids[shorter, :pad].tolist() == [PAD] * pad and mask[shorter, :pad].sum() == 0
    assert mask[shorter, pad:].all()
    assert out["tgt_sizes"].tolist() == [[32, 32], [23, 45], [32, 32], [32, 32]]
    # flat media lists in order of appearance give the same result as nested ones
    flat = processor(text=texts, images=[images[0][0], images[1][0]], audio=[tone(1.0)], return_tensors="pt")
    for key in out:
        assert torch.equal(out[key], flat[key])
    # batched and single processing agree on the unpadded tokens
    single = processor(text=texts[1], images=images[1], audio=[tone(1.0)], return_tensors="pt")
    assert single["input_ids"][0].tolist() == ids[1][mask[1].bool()].tolist()


def test_listen_tokens_are_removed(processor):
    out = processor(text="<unit><|listen|>hello<|listen|></unit>")
    assert LISTEN not in out["input_ids"][0]
    assert out["input_ids"][0][0] == 151683 and out["input_ids"][0][-1] == 151684


def test_count_and_length_errors(processor):
    with pytest.raises(PlaceholderCountMismatchError, match="1 <image>./</image> pattern.*2 image"):
        processor(text="<image>./</image>", images=[image(), image()])
    with pytest.raises(PlaceholderCountMismatchError, match="no image"):
        processor(text="<image>./</image>")
    with pytest.raises(PlaceholderCountMismatchError, match="2 <audio>./</audio> pattern.*1 audio"):
        processor(text="<audio>./</audio><audio>./</audio>", audio=[tone(1.0)])
    with pytest.raises(PlaceholderCountMismatchError, match="sample 1"):
        processor(text=["<image>./</image>", "none"], images=[[image()], [image()]])
    with pytest.raises(PlaceholderCountMismatchError, match="raw <image>"):
        processor(text="typed <image> by hand")
    with pytest.raises(PromptTooLongError, match="max_length=50"):
        processor(text="<image>./</image>", images=[image()], max_length=50)
    with pytest.raises(UnsupportedSamplingRateError, match="8000"):
        processor(text="<audio>./</audio>", audio=[tone(1.0)], sampling_rate=8000)
    with pytest.raises(TypeError, match="unexpected arguments.*bogus"):
        processor(text="hi", bogus=1)


def test_decode_passes_through(processor):
    ids = processor.tokenizer("Hello world")["input_ids"]
    assert processor.decode(ids) == "Hello world"
    assert processor.batch_decode([ids, ids]) == ["Hello world"] * 2


# ---- apply_chat_template with tokenize=True ---------------------------------------------------------------------
def test_apply_chat_template_tokenized_with_files(processor, tmp_path):
    image_path = tmp_path / "picture.png"
    image(700, 500).save(image_path)
    audio_path = tmp_path / "speech.wav"
    rng = np.random.default_rng(5)
    stereo_22k = (0.1 * rng.standard_normal((44100, 2))).astype(np.float32)
    soundfile.write(audio_path, stereo_22k, 22050)  # 2 s, stereo, 22.05 kHz -> mono 16 kHz
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Voice:"}, {"type": "audio", "audio": tone(1.0)}]},
        {"role": "user", "content": [
            {"type": "image", "path": str(image_path)},
            {"type": "audio", "audio": str(audio_path)},
            {"type": "text", "text": "Answer."},
        ]},
    ]
    out = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        use_tts_template=True,
    )
    ids = out["input_ids"][0].tolist()
    assert len(image_groups(ids)) == out["pixel_values"].shape[0] == out["tgt_sizes"].shape[0]
    assert sum(image_groups(ids)) == 64 * out["tgt_sizes"].shape[0]
    assert audio_groups(ids) == [10, audio_token_count(32000)] == [10, 20]
    assert out["input_features"].shape[0] == 2
    assert out["input_features_mask"].sum(dim=1).tolist() == [100, 200]
    assert ids[-1] == 151703  # <|tts_bos|>
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, use_tts_template=True)
    assert prompt.endswith(GEN + "<|tts_bos|>")
    # the direct call accepts the same local files
    direct = processor(text=prompt, images=[str(image_path)], audio=[tone(1.0), str(audio_path)],
                       ref_audio=tone(1.0), return_tensors="pt")
    assert set(out) == set(direct)
    for key in out:
        assert torch.equal(torch.as_tensor(out[key]), torch.as_tensor(direct[key]))
    # The system message's voice is handed through for speech generation (generate(return_audio=True)).
    np.testing.assert_array_equal(np.asarray(out["ref_audio"]), tone(1.0))


def test_apply_chat_template_matches_direct_call(processor):
    picture, wave = image(900, 600, seed=4), tone(1.5)
    messages = [{"role": "user", "content": [
        {"type": "image", "image": picture}, {"type": "audio", "audio": wave}, {"type": "text", "text": "Hi"}]}]
    via_chat = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"max_slice_nums": 2},
    )
    prompt = render_chat_prompt(messages, add_generation_prompt=True)
    direct = processor(text=prompt, images=[picture], audio=[wave], max_slice_nums=2, return_tensors="pt")
    assert set(via_chat) == set(direct)
    for key in direct:
        assert torch.equal(via_chat[key], direct[key])
    assert via_chat["tgt_sizes"].shape[0] == 3


def test_apply_chat_template_batched(processor):
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": image(seed=1)}, {"type": "text", "text": "A"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "A longer question without media"}]}],
    ]
    out = processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert out["input_ids"].shape[0] == 2 and out["pixel_values"].shape[0] == 1
    assert image_groups(out["input_ids"][0].tolist()) == [64]


def test_video_frames_with_audio_are_interleaved(processor):
    frames = [image(64, 48, seed=i) for i in range(3)]
    messages = [{"role": "user", "content": [
        {"type": "video", "video": frames, "audio": tone(3.0)}, {"type": "text", "text": "What happens?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    # Official: any audio item ends the generation prompt with <|tts_bos|>, speech generated or not.
    assert prompt == ("<|im_start|>user\n" + "<image>./</image><audio>./</audio>" * 3 + "What happens?<|im_end|>\n"
                      + GEN + "<|tts_bos|>")
    out = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"max_slice_nums": 1},
    )
    ids = out["input_ids"][0].tolist()
    assert image_groups(ids) == [64] * 3 and audio_groups(ids) == [10] * 3
    assert out["pixel_values"].shape[0] == 3 and out["input_features"].shape[0] == 3
    with pytest.raises(UnsupportedContentTypeError, match="video"):
        render_chat_prompt(messages)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg binary")
def test_video_file_is_read_at_one_fps(processor, tmp_path):
    path = tmp_path / "clip.mp4"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=5", "-f", "lavfi",
         "-i", "sine=frequency=440:sample_rate=16000", "-t", "3", "-pix_fmt", "yuv420p", "-shortest", str(path)],
        check=True,
    )
    messages = [{"role": "user", "content": [{"type": "video", "video": str(path)}, {"type": "text", "text": "?"}]}]
    out = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"max_slice_nums": 1},
    )
    ids = out["input_ids"][0].tolist()
    assert len(image_groups(ids)) == 3 and len(audio_groups(ids)) == 3
    assert out["input_features"].shape[0] == 3


def test_media_loading_errors(processor, tmp_path):
    with pytest.raises(MediaLoadingError, match="URL"):
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image", "url": "https://example.com/a.png"}]}],
            tokenize=True, return_dict=True,
        )
    with pytest.raises(MediaLoadingError, match="not found"):
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "audio", "audio": str(tmp_path / "missing.wav")}]}],
            tokenize=True, return_dict=True,
        )
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF1234WAVEjunk")
    with pytest.raises(MediaLoadingError, match="cannot read audio"):
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "audio", "audio": str(corrupt)}]}], tokenize=True, return_dict=True
        )


# ---- save / load ------------------------------------------------------------------------------------------------
def test_save_load_round_trip(processor, tmp_path):
    custom = MiniCPMOProcessor.from_defaults(max_slice_nums=4, use_image_id=False)
    custom.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    assert (tmp_path / "processor_config.json").is_file()
    loaded = MiniCPMOProcessor.from_pretrained(tmp_path)
    assert loaded.image_processor.max_slice_nums == 4 and loaded.image_processor.use_image_id is False
    messages = [
        {"role": "system", "content": [{"type": "audio", "audio": tone(1.2)}]},
        {"role": "user", "content": [{"type": "image", "image": image(1344, 896)}, {"type": "text", "text": "Hm"}]},
    ]
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    before, after = custom.apply_chat_template(messages, **kwargs), loaded.apply_chat_template(messages, **kwargs)
    assert set(before) == set(after)
    for key in before:
        assert torch.equal(before[key], after[key])
    assert len(loaded.tokenizer) == 151748


def test_per_sample_lists_of_audio_paths(tmp_path):
    import soundfile

    from minicpmo import MiniCPMOProcessor

    paths = []
    for k in range(2):
        path = tmp_path / f"a{k}.wav"
        soundfile.write(path, (0.1 * np.sin(np.arange(16000 * (k + 1)) / 10)).astype(np.float32), 16000)
        paths.append(str(path))
    texts = ["<audio>./</audio> one", "<audio>./</audio> two"]
    out = MiniCPMOProcessor.from_defaults()(text=texts, audio=[[paths[0]], [paths[1]]], return_tensors="pt")
    assert out["input_features"].shape[0] == 2
    assert out["input_features_mask"].sum(-1).tolist() == [100, 200]
