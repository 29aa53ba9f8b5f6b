"""NaViT-style SigLIP vision tower of MiniCPM-o 4.5 (checkpoint prefix `vpm.`).

Each image slice arrives as a one-patch-high "strip" (3, p, h*w*p): its p x p patches laid out row-major along
the width. A batch pads the strips to the longest one. Slices have arbitrary (h, w) patch grids, so the learned
position table (side x side, 70 x 70 for the real model) is indexed through a bucketing of the fractional patch
coordinates instead of by absolute position. Padded patches are hidden from real ones by a key mask, so a
slice gives the same features whatever it is batched with.

The encoder layers are transformers' own `SiglipEncoder`, so the parameter names are the official ones and
the attention backend follows `config._attn_implementation` ("eager", "sdpa", flash...).
"""

from collections.abc import Iterator
from functools import lru_cache
from typing import NamedTuple

import torch
from torch import nn
from transformers import SiglipVisionConfig
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.siglip.modeling_siglip import SiglipEncoder

from ..errors import ImageInputError


class VisionInputError(ImageInputError):
    """Pixel strips or target sizes that do not describe a valid batch of image slices."""


class MiniCPMOVisionOutput(NamedTuple):
    """Per-patch features of a padded batch of slices; unpacks as `(last_hidden_state, patch_mask)`.

    last_hidden_state: [N, Lmax, hidden]; rows past a slice's h*w patches are zero.
    patch_mask: [N, Lmax] bool, True for real patches.
    """

    last_hidden_state: torch.Tensor
    patch_mask: torch.Tensor


@lru_cache(maxsize=1024)
def _bucketized_position_ids_cached(height: int, width: int, num_patches_per_side: int) -> torch.Tensor:
    # Float32 on CPU on purpose: the official ids come from exactly this float32 arithmetic, and the
    # fractional coordinates of an exact bucket edge (e.g. 1/35 vs 2/70) depend on it. The official step is
    # `1 / nb` with nb an integer tensor (the patch count read off the mask), i.e. 1/nb rounded to float32;
    # the boundaries' step is a Python double (the side is a plain int). 44 of the ids of a 25x10 + 49x7 batch
    # differ between a double and a float32 coordinate step.
    boundaries = torch.arange(1 / num_patches_per_side, 1.0, 1 / num_patches_per_side, dtype=torch.float32)
    fractional_h = torch.arange(0, 1 - 1e-6, 1 / torch.tensor(height), dtype=torch.float32)
    fractional_w = torch.arange(0, 1 - 1e-6, 1 / torch.tensor(width), dtype=torch.float32)
    bucket_h = torch.bucketize(fractional_h, boundaries, right=True)
    bucket_w = torch.bucketize(fractional_w, boundaries, right=True)
    return (bucket_h[:, None] * num_patches_per_side + bucket_w[None, :]).flatten()


def bucketized_position_ids(height: int, width: int, num_patches_per_side: int) -> torch.Tensor:
    """Position-table ids ([height*width] long, row-major) of an (height x width)-patch slice.

    Row i and column j map to buckets bucketize(i/height) and bucketize(j/width) over the boundaries
    1/side, 2/side, ... (right=True); the id is bucket_row * side + bucket_col. This is floor(i*side/height)
    except where float32 rounding moves an exact bucket edge.
    """
    if height < 1 or width < 1:
        raise VisionInputError(f"a slice needs at least one patch per side, got height={height}, width={width}")
    return _bucketized_position_ids_cached(int(height), int(width), int(num_patches_per_side)).clone()


def patch_mask_from_tgt_sizes(tgt_sizes: torch.Tensor, max_patches: int) -> torch.Tensor:
    """[N, max_patches] bool mask of the real patches: the first h*w positions of each strip."""
    num_patches = (tgt_sizes[:, 0] * tgt_sizes[:, 1]).to(torch.long)
    positions = torch.arange(max_patches, device=tgt_sizes.device)
    return positions[None, :] < num_patches[:, None]


def vision_batches(num_slices: int, batch_size: int | None) -> Iterator[slice]:
    """Index ranges that cut `num_slices` slices into chunks of at most `batch_size` (all at once when None)."""
    if batch_size is not None and batch_size < 1:
        raise VisionInputError(f"vision_batch_size must be >= 1, got {batch_size}")
    step = num_slices if batch_size is None else batch_size
    for start in range(0, num_slices, max(step, 1)):
        yield slice(start, min(start + step, num_slices))


def validate_vision_inputs(pixel_values: torch.Tensor, tgt_sizes: torch.Tensor, patch_size: int) -> int:
    """Check the strip layout against tgt_sizes and return the padded patch count Lmax."""
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
        raise VisionInputError("pixel_values must be a floating-point tensor of shape [N, 3, patch, Lmax*patch]")
    if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        raise VisionInputError(
            f"pixel_values must have shape [N, 3, patch, Lmax*patch], got {tuple(pixel_values.shape)}"
        )
    if pixel_values.shape[2] != patch_size or pixel_values.shape[3] % patch_size != 0:
        raise VisionInputError(
            f"pixel_values must be one-patch-high strips [N, 3, {patch_size}, Lmax*{patch_size}], "
            f"got {tuple(pixel_values.shape)}"
        )
    if not isinstance(tgt_sizes, torch.Tensor) or tgt_sizes.is_floating_point() or tgt_sizes.is_complex():
        raise VisionInputError("tgt_sizes must be an integer tensor of shape [N, 2] holding (h, w) in patches")
    if tgt_sizes.dim() != 2 or tgt_sizes.shape[1] != 2 or tgt_sizes.shape[0] != pixel_values.shape[0]:
        raise VisionInputError(
            f"tgt_sizes must have shape [N, 2] with N={pixel_values.shape[0]}, got {tuple(tgt_sizes.shape)}"
        )
    max_patches = pixel_values.shape[3] // patch_size
    if tgt_sizes.numel() and bool((tgt_sizes < 1).any()):
        raise VisionInputError(f"every slice needs h, w >= 1 patches, got tgt_sizes={tgt_sizes.tolist()}")
    if tgt_sizes.numel() and int((tgt_sizes[:, 0] * tgt_sizes[:, 1]).max()) > max_patches:
        raise VisionInputError(
            f"a slice of tgt_sizes={tgt_sizes.tolist()} has more patches than the strip width holds ({max_patches})"
        )
    return max_patches


class MiniCPMOVisionEmbeddings(nn.Module):
    """Patch embedding (Conv2d, kernel = stride = patch) plus bucketised learned positions."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.patch_size = config.patch_size
        self.num_patches_per_side = config.image_size // config.patch_size
        self.num_positions = self.num_patches_per_side**2
        self.patch_embedding = nn.Conv2d(
            in_channels=config.num_channels,
            out_channels=self.embed_dim,
            kernel_size=self.patch_size,
            stride=self.patch_size,
            padding="valid",
        )
        self.position_embedding = nn.Embedding(self.num_positions, self.embed_dim)

    def position_ids(self, tgt_sizes: torch.Tensor, max_patches: int) -> torch.Tensor:
        """[N, max_patches] table ids; padded positions use id 0 (they are masked out anyway)."""
        ids = torch.zeros(len(tgt_sizes), max_patches, dtype=torch.long)
        for row, (height, width) in enumerate(tgt_sizes.tolist()):
            ids[row, : height * width] = bucketized_position_ids(height, width, self.num_patches_per_side)
        return ids

    def forward(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, p, Lmax*p], tgt_sizes [N, 2] -> embeddings [N, Lmax, hidden]."""
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(dtype=weight.dtype))  # [N, hidden, 1, Lmax]
        embeddings = patches.flatten(2).transpose(1, 2)
        position_ids = self.position_ids(tgt_sizes, embeddings.shape[1]).to(embeddings.device)
        return embeddings + self.position_embedding(position_ids)


class MiniCPMOVisionTransformer(nn.Module):
    """SigLIP ViT over padded slice strips: embeddings -> SiglipEncoder -> post_layernorm.

    `config._attn_implementation` picks the attention backend; it is set to "sdpa" when the config has none
    (a PreTrainedModel owner normally sets it). Gradient checkpointing works through the encoder layers
    (transformers `GradientCheckpointingLayer`), switched on by the owning model's
    `gradient_checkpointing_enable()`.
    """

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        if config._attn_implementation is None:
            config._attn_implementation = "sdpa"
        self.config = config
        self.embed_dim = config.hidden_size
        self.patch_size = config.patch_size
        self.embeddings = MiniCPMOVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def _encode(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor, patch_mask: torch.Tensor, **kwargs):
        hidden_states = self.embeddings(pixel_values, tgt_sizes)
        # Masks keys only: padded query rows still see the real patches, so no row is fully masked.
        # All-real batches get no mask at all (faster kernels).
        attention_mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden_states, attention_mask=patch_mask
        )
        hidden_states = self.encoder(inputs_embeds=hidden_states, attention_mask=attention_mask, **kwargs)
        hidden_states = self.post_layernorm(hidden_states.last_hidden_state)
        return hidden_states.masked_fill(~patch_mask[..., None], 0.0)

    def forward(
        self,
        pixel_values: torch.Tensor,
        tgt_sizes: torch.Tensor,
        vision_batch_size: int | None = None,
        **kwargs,
    ) -> MiniCPMOVisionOutput:
        """pixel_values [N, 3, p, Lmax*p], tgt_sizes [N, 2] (h, w) -> MiniCPMOVisionOutput.

        With `vision_batch_size`, slices are encoded in chunks of that many (the official default is 16) to
        bound activation memory; each chunk is trimmed to its own longest slice. The result does not depend
        on the chunking.
        """
        max_patches = validate_vision_inputs(pixel_values, tgt_sizes, self.patch_size)
        patch_mask = patch_mask_from_tgt_sizes(tgt_sizes, max_patches).to(pixel_values.device)
        num_patches = (tgt_sizes[:, 0] * tgt_sizes[:, 1]).tolist()
        chunks = []
        for rows in vision_batches(len(tgt_sizes), vision_batch_size):
            chunk_patches = max(num_patches[rows])
            chunk_pixels = pixel_values[rows, :, :, : chunk_patches * self.patch_size]
            features = self._encode(chunk_pixels, tgt_sizes[rows], patch_mask[rows, :chunk_patches], **kwargs)
            chunks.append(nn.functional.pad(features, (0, 0, 0, max_patches - chunk_patches)))
        if chunks:
            last_hidden_state = torch.cat(chunks, dim=0)
        else:
            dtype = self.post_layernorm.weight.dtype
            last_hidden_state = pixel_values.new_zeros(0, max_patches, self.embed_dim, dtype=dtype)
        return MiniCPMOVisionOutput(last_hidden_state=last_hidden_state, patch_mask=patch_mask)


__all__ = [
    "MiniCPMOVisionEmbeddings",
    "MiniCPMOVisionOutput",
    "MiniCPMOVisionTransformer",
    "VisionInputError",
    "bucketized_position_ids",
    "patch_mask_from_tgt_sizes",
    "vision_batches",
]
