"""LLaVA-UHD image slicing of MiniCPM-o 4.5 (official `MiniCPMVImageProcessor` behaviour).

An image becomes a thumbnail (about 448x448 px) plus, when its area exceeds 448^2, a grid of up to
`max_slice_nums` slices of about 448^2 each. Each slice is normalised with mean = std = 0.5 and laid out as a
strip of 14x14 patches, shape (3, 14, h*w*14), so that slices of different shapes can be padded together for
the NaViT vision encoder. `tgt_sizes` holds (h, w) in patches for each slice.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from ..errors import ImageInputError


class InvalidImageError(ImageInputError):
    """An image that cannot be sliced: empty, one pixel wide or high, or absurdly large."""


class UnsupportedImageTypeError(ImageInputError, TypeError):
    """An image given as something other than a PIL image, a numpy array or a torch tensor."""


# Images beyond this many pixels are refused rather than resized (PIL's own bomb limit is ~89 Mpx).
MAX_IMAGE_PIXELS = 64_000_000


def ensure_divide(length: float, patch_size: int) -> int:
    """Round `length` to the nearest multiple of `patch_size`, never below one patch (Python `round`)."""
    return max(round(length / patch_size) * patch_size, patch_size)


def find_best_resize(
    size: tuple[float, float], scale_resolution: int, patch_size: int, allow_upscale: bool = False
) -> tuple[int, int]:
    """Size (W, H) with area about `scale_resolution`^2 and the same aspect ratio, in multiples of the patch."""
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        aspect = width / height
        height = int(scale_resolution / math.sqrt(aspect))
        width = int(height * aspect)
    return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def get_sliced_grid(
    size: tuple[int, int], max_slice_nums: int, scale_resolution: int = 448
) -> tuple[int, int] | None:
    """Best (cols, rows) grid for an image of size (W, H), or None when the image is small enough not to slice."""
    width, height = size
    ratio = width * height / (scale_resolution * scale_resolution)
    multiple = min(math.ceil(ratio), max_slice_nums)
    if multiple <= 1:
        return None
    slice_counts = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slice_nums]
    log_aspect = math.log(width / height)
    best_grid, best_error = None, float("inf")
    for count in slice_counts:
        for cols in range(1, count + 1):
            if count % cols:
                continue
            rows = count // cols
            error = abs(log_aspect - math.log(cols / rows))
            if error < best_error:  # strict: the first minimum wins
                best_grid, best_error = (cols, rows), error
    return best_grid


def get_refine_size(
    size: tuple[int, int], grid: tuple[int, int], scale_resolution: int, patch_size: int
) -> tuple[int, int]:
    """Size (W, H) the image is resized to before it is cut into the grid, each cell about 448^2."""
    width, height = size
    cols, rows = grid
    cell_width = ensure_divide(width, cols) / cols
    cell_height = ensure_divide(height, rows) / rows
    best_cell = find_best_resize((cell_width, cell_height), scale_resolution, patch_size, allow_upscale=True)
    return best_cell[0] * cols, best_cell[1] * rows


def image_placeholder_text(
    grid: tuple[int, int] | None,
    image_idx: int = 0,
    use_image_id: bool = True,
    image_feature_size: int = 64,
    unk_token: str = "<unk>",
) -> str:
    """Prompt text that replaces one `<image>./</image>`: thumbnail slots, then one line of slice slots per row."""
    slots = unk_token * image_feature_size
    text = f"<image_id>{image_idx}</image_id>" if use_image_id else ""
    text += f"<image>{slots}</image>"
    if grid is not None:
        cols, rows = grid
        row_text = f"<slice>{slots}</slice>" * cols
        text += "\n".join([row_text] * rows)
    return text


def _to_pil_rgb(image: Any) -> Image.Image:
    """Accept PIL, HWC/CHW numpy arrays or torch tensors (uint8 0-255 or float 0-1) and return an RGB PIL image."""
    if isinstance(image, Image.Image):
        pil = image
    else:
        if type(image).__module__.startswith("torch"):
            image = image.detach().cpu().numpy()
        if not isinstance(image, np.ndarray):
            raise UnsupportedImageTypeError(
                f"image must be a PIL.Image, numpy array or torch tensor, got {type(image).__name__}"
            )
        array = image
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = np.transpose(array, (1, 2, 0))
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise InvalidImageError(f"image array must be HxW, HxWx3 or HxWx4, got shape {tuple(image.shape)}")
        if array.size == 0:
            raise InvalidImageError(f"image is empty (shape {tuple(image.shape)})")
        if np.issubdtype(array.dtype, np.floating):
            if not np.isfinite(array).all():
                raise InvalidImageError("image array contains NaN or infinite values")
            array = np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8)
        elif array.dtype != np.uint8:
            raise InvalidImageError(f"image array must be uint8 or float in [0, 1], got dtype {array.dtype}")
        pil = Image.fromarray(array)
    width, height = pil.size
    if width < 2 or height < 2:
        raise InvalidImageError(f"image of size {width}x{height} is too small: both sides need at least 2 pixels")
    if width * height > MAX_IMAGE_PIXELS:
        raise InvalidImageError(f"image of size {width}x{height} exceeds the limit of {MAX_IMAGE_PIXELS} pixels")
    return pil if pil.mode == "RGB" else pil.convert("RGB")


class MiniCPMOImageProcessor(BaseImageProcessor):
    """Slices images the LLaVA-UHD way and returns, per image, the patch strips and their (h, w) in patches."""

    model_input_names = ["pixel_values", "tgt_sizes"]

    def __init__(
        self,
        max_slice_nums: int = 9,
        scale_resolution: int = 448,
        patch_size: int = 14,
        use_image_id: bool = True,
        image_feature_size: int = 64,
        slice_mode: bool = True,
        norm_mean: list[float] | tuple[float, ...] = (0.5, 0.5, 0.5),
        norm_std: list[float] | tuple[float, ...] = (0.5, 0.5, 0.5),
        **kwargs,
    ):
        # Keys of the official preprocessor_config that belong to the processor, not to slicing.
        for key in ("im_start", "im_end", "slice_start", "slice_end", "unk", "im_id_start", "im_id_end",
                    "audio_pool_step", "version", "auto_map", "image_processor_type"):
            kwargs.pop(key, None)
        super().__init__(**kwargs)
        if int(max_slice_nums) < 1:
            raise ValueError(f"max_slice_nums must be >= 1, got {max_slice_nums}")
        if int(patch_size) < 1 or int(scale_resolution) < int(patch_size):
            raise ValueError(f"need scale_resolution ({scale_resolution}) >= patch_size ({patch_size}) >= 1")
        self.max_slice_nums = int(max_slice_nums)
        self.scale_resolution = int(scale_resolution)
        self.patch_size = int(patch_size)
        self.use_image_id = bool(use_image_id)
        self.image_feature_size = int(image_feature_size)
        self.slice_mode = bool(slice_mode)
        self.norm_mean = [float(v) for v in norm_mean]
        self.norm_std = [float(v) for v in norm_std]

    # ---- geometry -------------------------------------------------------------------------------------------
    def get_grid(self, image_size: tuple[int, int], max_slice_nums: int | None = None) -> tuple[int, int] | None:
        """(cols, rows) for an image of size (W, H), None when it is not sliced."""
        max_slices = self.max_slice_nums if max_slice_nums is None else int(max_slice_nums)
        if not self.slice_mode or max_slices < 1:
            return None
        return get_sliced_grid(image_size, max_slices, self.scale_resolution)

    def slice_image(self, image: Image.Image, max_slice_nums: int | None = None):
        """Thumbnail first, then the grid slices row-major; returns (list of PIL images, grid or None)."""
        grid = self.get_grid(image.size, max_slice_nums)
        if grid is None:
            size = find_best_resize(image.size, self.scale_resolution, self.patch_size, allow_upscale=True)
            return [image.resize(size, Image.Resampling.BICUBIC)], None
        thumb_size = find_best_resize(image.size, self.scale_resolution, self.patch_size)
        thumbnail = image.resize(thumb_size, Image.Resampling.BICUBIC)
        refine_size = get_refine_size(image.size, grid, self.scale_resolution, self.patch_size)
        refined = image.resize(refine_size, Image.Resampling.BICUBIC)
        cols, rows = grid
        cell_w, cell_h = refine_size[0] // cols, refine_size[1] // rows
        slices = [
            refined.crop((col * cell_w, row * cell_h, (col + 1) * cell_w, (row + 1) * cell_h))
            for row in range(rows)
            for col in range(cols)
        ]
        return [thumbnail] + slices, grid

    # ---- pixels ---------------------------------------------------------------------------------------------
    def to_patch_strip(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        """Normalise one slice and lay its 14x14 patches out row-major as a (3, 14, h*w*14) float32 strip."""
        p = self.patch_size
        pixels = np.asarray(image, dtype=np.float32) / 255.0  # H, W, 3
        mean = np.asarray(self.norm_mean, dtype=np.float32)
        std = np.asarray(self.norm_std, dtype=np.float32)
        pixels = ((pixels - mean) / std).transpose(2, 0, 1)  # 3, H, W
        channels, height, width = pixels.shape
        h, w = height // p, width // p
        strip = pixels.reshape(channels, h, p, w, p).transpose(0, 2, 1, 3, 4).reshape(channels, p, h * w * p)
        return np.ascontiguousarray(strip, dtype=np.float32), (h, w)

    def preprocess(self, images, max_slice_nums: int | None = None, return_tensors=None, **kwargs) -> BatchFeature:
        """Slice a single image or a list of images.

        Returns a BatchFeature with, per image: `pixel_values` (list of (3, 14, L*14) strips), `tgt_sizes`
        (int64 array [n_slices, 2] of (h, w) in patches), `image_sizes` (W, H) and `grids` ((cols, rows) or None).
        `return_tensors` is ignored: strips of different lengths are padded by the processor.
        """
        if kwargs:
            raise TypeError(f"unexpected arguments for MiniCPMOImageProcessor: {sorted(kwargs)}")
        if isinstance(images, (list, tuple)):
            image_list = list(images)
        else:
            image_list = [images]
        pixel_values, tgt_sizes, image_sizes, grids = [], [], [], []
        for image in image_list:
            pil = _to_pil_rgb(image)
            parts, grid = self.slice_image(pil, max_slice_nums)
            strips, sizes = zip(*(self.to_patch_strip(part) for part in parts))
            pixel_values.append(list(strips))
            tgt_sizes.append(np.asarray(sizes, dtype=np.int64))
            image_sizes.append(pil.size)
            grids.append(grid)
        return BatchFeature(
            data={"pixel_values": pixel_values, "tgt_sizes": tgt_sizes, "image_sizes": image_sizes, "grids": grids}
        )

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def placeholder_text(
        self, grid: tuple[int, int] | None, image_idx: int = 0, use_image_id: bool | None = None
    ) -> str:
        """Prompt text for one image whose grid was returned by `preprocess`."""
        use_id = self.use_image_id if use_image_id is None else use_image_id
        return image_placeholder_text(grid, image_idx, use_id, self.image_feature_size)


def stack_patch_strips(strips: list[np.ndarray]) -> np.ndarray:
    """Zero-pad patch strips (3, p, L*p) of different lengths into one [N, 3, p, Lmax*p] array."""
    max_len = max(strip.shape[-1] for strip in strips)
    pixel_values = np.zeros((len(strips), *strips[0].shape[:2], max_len), dtype=np.float32)
    for row, strip in enumerate(strips):
        pixel_values[row, :, :, : strip.shape[-1]] = strip
    return pixel_values
