"""LLaVA-UHD slicing: grids, sizes in patches, strip layout, normalisation, placeholder text, bad input."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from minicpmo.processing.image_processing_minicpmo import (  # noqa: E402
    InvalidImageError,
    MiniCPMOImageProcessor,
    UnsupportedImageTypeError,
    ensure_divide,
    find_best_resize,
    get_refine_size,
    get_sliced_grid,
    image_placeholder_text,
)

UNK64 = "<unk>" * 64


def random_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def processor():
    return MiniCPMOImageProcessor()


def test_geometry_helpers_by_hand():
    assert ensure_divide(547, 14) == 546 and ensure_divide(365, 14) == 364 and ensure_divide(3, 14) == 14
    # 1344x896 (area 6*448^2): r=1.5, H'=int(448/sqrt(1.5))=365, W'=int(365*1.5)=547 -> (546, 364)
    assert find_best_resize((1344, 896), 448, 14) == (546, 364)
    # small image is kept (only rounded) unless upscaling is allowed
    assert find_best_resize((100, 50), 448, 14) == (98, 56)
    # upscale: r=2, H'=int(448/sqrt 2)=316, W'=632 -> (630, 322)
    assert find_best_resize((100, 50), 448, 14, allow_upscale=True) == (630, 322)
    assert get_refine_size((1344, 896), (3, 2), 448, 14) == (1344, 896)


@pytest.mark.parametrize(
    "size, max_slices, grid",
    [
        ((448, 448), 9, None),          # area == 448^2 -> one slice only
        ((100, 50), 9, None),
        ((1344, 896), 9, (3, 2)),       # ratio 6, log(1.5) exactly matched by 3x2
        ((3000, 300), 9, (6, 1)),       # ratio 4.48 -> {4,5,6}; 6x1 is closest to log(10)
        ((2000, 2000), 9, (3, 3)),      # ratio 19.9 capped at 9 -> {8,9}; 3x3 exact
        ((1344, 896), 1, None),         # max_slice_nums=1 never slices
        ((896, 448), 9, (2, 1)),
    ],
)
def test_sliced_grid(size, max_slices, grid):
    assert get_sliced_grid(size, max_slices) == grid


@pytest.mark.parametrize(
    "size, max_slices, expected_tgt",
    [
        # no slicing: upscaled to ~448^2
        ((448, 448), 9, [(32, 32)]),
        ((100, 50), 9, [(23, 45)]),
        # thumbnail (26, 39) then 3x2 cells of 448x448
        ((1344, 896), 9, [(26, 39)] + [(32, 32)] * 6),
        # max_slice_nums=1: only the upscaled/downscaled source image
        ((1344, 896), 1, [(26, 39)]),
        # thumbnail: r=10, H'=141, W'=1410 -> (140, 1414) = (10, 101) patches;
        # refine cell (500, 300) upscaled: r=5/3, H'=347, W'=578 -> (574, 350) = (25, 41) patches, 6x1
        ((3000, 300), 9, [(10, 101)] + [(25, 41)] * 6),
        # 9-slice cap: thumbnail 448^2, cell ensure_divide(2000,3)/3 = 667 -> 448 -> 3x3 of (32, 32)
        ((2000, 2000), 9, [(32, 32)] * 10),
    ],
)
def test_tgt_sizes_and_strips(processor, size, max_slices, expected_tgt):
    out = processor(random_image(*size), max_slice_nums=max_slices)
    tgt = out["tgt_sizes"][0]
    assert [tuple(row) for row in tgt.tolist()] == expected_tgt
    strips = out["pixel_values"][0]
    assert len(strips) == len(expected_tgt)
    for strip, (h, w) in zip(strips, expected_tgt):
        assert strip.shape == (3, 14, h * w * 14) and strip.dtype == np.float32
        assert strip.min() >= -1.0 and strip.max() <= 1.0
    assert out["image_sizes"][0] == size


def test_default_max_slice_nums_comes_from_config():
    processor = MiniCPMOImageProcessor(max_slice_nums=2)
    out = processor(random_image(1344, 896))
    assert out["grids"][0] in {(2, 1), (1, 2)} and len(out["pixel_values"][0]) == 3


def test_strip_layout_is_row_major_patches(processor):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(28, 42, 3), dtype=np.uint8)  # 2 x 3 patches
    strip, (h, w) = processor.to_patch_strip(Image.fromarray(pixels))
    assert (h, w) == (2, 3)
    normalised = (pixels.astype(np.float32) / 255.0 - 0.5) / 0.5
    for patch_row in range(h):
        for patch_col in range(w):
            index = patch_row * w + patch_col
            expected = normalised[patch_row * 14:(patch_row + 1) * 14, patch_col * 14:(patch_col + 1) * 14]
            np.testing.assert_allclose(strip[:, :, index * 14:(index + 1) * 14], expected.transpose(2, 0, 1), atol=1e-6)


def test_resizing_is_pil_bicubic_and_slices_are_row_major(processor):
    image = random_image(896, 448, seed=3)
    out = processor(image)
    assert out["grids"][0] == (2, 1)
    thumb_strip, slice_strips = out["pixel_values"][0][0], out["pixel_values"][0][1:]
    # thumbnail: area 2*448^2 > 448^2 -> r=2, H'=316, W'=632 -> (630, 322)
    expected_thumb = image.resize((630, 322), Image.Resampling.BICUBIC)
    np.testing.assert_allclose(thumb_strip, processor.to_patch_strip(expected_thumb)[0], atol=1e-6)
    # refine size is (896, 448): no resize, the two slices are the left and right halves
    for col, strip in enumerate(slice_strips):
        crop = image.crop((col * 448, 0, (col + 1) * 448, 448))
        np.testing.assert_allclose(strip, processor.to_patch_strip(crop)[0], atol=1e-6)


def test_placeholder_text_exact():
    assert image_placeholder_text(None, 0, use_image_id=False) == "<image>" + UNK64 + "</image>"
    assert image_placeholder_text(None, 2, use_image_id=True) == "<image_id>2</image_id><image>" + UNK64 + "</image>"
    row = "<slice>" + UNK64 + "</slice>"
    expected = "<image_id>0</image_id><image>" + UNK64 + "</image>" + row * 3 + "\n" + row * 3
    assert image_placeholder_text((3, 2), 0, use_image_id=True) == expected
    assert expected.count("<unk>") == 64 * 7


def test_placeholder_counts_match_slices(processor):
    for size in [(448, 448), (1344, 896), (3000, 300), (2000, 2000)]:
        out = processor(random_image(*size))
        text = processor.placeholder_text(out["grids"][0], image_idx=0)
        assert text.count("<unk>") == 64 * len(out["pixel_values"][0])
        assert text.count("<image>") + text.count("<slice>") == len(out["pixel_values"][0])


def test_accepts_numpy_arrays_and_grayscale(processor):
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
    from_array = processor(hwc)["pixel_values"][0][0]
    from_pil = processor(Image.fromarray(hwc))["pixel_values"][0][0]
    np.testing.assert_array_equal(from_array, from_pil)
    gray = Image.fromarray(rng.integers(0, 256, size=(60, 80), dtype=np.uint8), mode="L")
    assert processor(gray)["pixel_values"][0][0].shape[0] == 3
    floats = hwc.astype(np.float32) / 255.0
    np.testing.assert_allclose(processor(floats)["pixel_values"][0][0], from_pil, atol=1e-6)


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (np.zeros((0, 10, 3), dtype=np.uint8), InvalidImageError, "empty"),
        (Image.new("RGB", (1, 1)), InvalidImageError, "too small"),
        (Image.new("RGB", (1, 500)), InvalidImageError, "1x500"),
        (np.full((8, 8, 3), np.nan, dtype=np.float32), InvalidImageError, "NaN"),
        (np.zeros((8, 8, 3), dtype=np.int64), InvalidImageError, "dtype"),
        ("not-an-image", UnsupportedImageTypeError, "str"),
        (12, UnsupportedImageTypeError, "int"),
    ],
)
def test_bad_images_raise_typed_errors(processor, bad, error, message):
    with pytest.raises(error, match=message):
        processor(bad)


def test_config_round_trip(tmp_path):
    processor = MiniCPMOImageProcessor(max_slice_nums=4, use_image_id=False)
    processor.save_pretrained(tmp_path)
    loaded = MiniCPMOImageProcessor.from_pretrained(tmp_path)
    assert loaded.max_slice_nums == 4 and loaded.use_image_id is False and loaded.scale_resolution == 448
    # the official preprocessor_config.json keys are accepted too
    official = MiniCPMOImageProcessor(
        max_slice_nums=9, scale_resolution=448, patch_size=14, use_image_id=True, image_feature_size=64,
        im_start="<image>", im_end="</image>", slice_start="<slice>", slice_end="</slice>", unk="<unk>",
        im_id_start="<image_id>", im_id_end="</image_id>", slice_mode=True, audio_pool_step=5,
        norm_mean=[0.5, 0.5, 0.5], norm_std=[0.5, 0.5, 0.5], version=4.5,
    )
    assert official.max_slice_nums == 9 and official.norm_mean == [0.5, 0.5, 0.5]
