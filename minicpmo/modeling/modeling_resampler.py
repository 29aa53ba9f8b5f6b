"""Perceiver resampler of MiniCPM-o 4.5 (checkpoint prefix `resampler.`).

It turns a variable number of SigLIP patch features of one slice into a fixed number of LLM-width tokens:
learned queries cross-attend (one `nn.MultiheadAttention`) to the projected patches. The keys carry a 2-D
sin-cos position of each patch on the slice's (h, w) grid; values and queries carry none. Padded patches are
hidden with a key padding mask, so a slice's tokens do not depend on what it is batched with.
"""

import torch
from torch import nn
from transformers import initialization as init

from ..errors import ImageInputError


class ResamplerInputError(ImageInputError):
    """Features, target sizes or patch mask that do not describe a valid padded batch of slices."""


def _sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[len(positions), embed_dim]: [sin(p * omega), cos(p * omega)], omega_i = 1 / 10000^(i / (embed_dim/2))."""
    exponent = torch.arange(embed_dim // 2, dtype=torch.float32) / (embed_dim / 2.0)
    omega = 1.0 / 10000**exponent
    angles = positions.to(torch.float32)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, height: int, width: int) -> torch.Tensor:
    """Float32 2-D sin-cos table [height, width, embed_dim] (computed on CPU).

    The first embed_dim/2 channels encode the column index w, the last embed_dim/2 the row index h; each half
    is [sin, cos] with omega_i = 1/10000^(i/(embed_dim/4)), i < embed_dim/4 (the official layout).
    """
    if embed_dim % 4 != 0:
        raise ResamplerInputError(f"2-D sin-cos embedding needs embed_dim divisible by 4, got {embed_dim}")
    if height < 1 or width < 1:
        raise ResamplerInputError(f"2-D sin-cos table needs height, width >= 1, got {height}x{width}")
    half = embed_dim // 2
    column_code = _sincos_1d(half, torch.arange(width))  # [w, D/2]
    row_code = _sincos_1d(half, torch.arange(height))  # [h, D/2]
    return torch.cat(
        [column_code[None, :, :].expand(height, -1, -1), row_code[:, None, :].expand(-1, width, -1)], dim=-1
    )


class MiniCPMOResampler(nn.Module):
    """Cross-attention from `num_queries` learned queries to a slice's patch features.

    forward(x [N, L, kv_dim], tgt_sizes [N, 2], patch_mask [N, L] bool | None) -> [N, num_queries, embed_dim].

    `pos_embed` is a non-persistent float32 buffer ([max_h, max_w, embed_dim], 70 x 70 by default) that grows
    when a slice is larger. Models built on the meta device (transformers 5 `from_pretrained`) must call
    `reset_parameters_and_buffers()` to rebuild it; the owning model's `_init_weights` does that.
    """

    def __init__(
        self,
        num_queries: int,
        embed_dim: int,
        num_heads: int,
        kv_dim: int,
        max_size: tuple[int, int] = (70, 70),
        layer_norm_eps: float = 1e-6,
    ):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ResamplerInputError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if embed_dim % 4 != 0:
            raise ResamplerInputError(f"embed_dim must be divisible by 4 for the 2-D sin-cos table, got {embed_dim}")
        self.num_queries = num_queries
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.kv_dim = kv_dim
        self.query = nn.Parameter(torch.empty(num_queries, embed_dim))
        # The official checkpoint always has kv_proj.weight, so it is a Linear even when kv_dim == embed_dim.
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False)
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        self.ln_post = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        self.proj = nn.Parameter(torch.empty(embed_dim, embed_dim))
        max_h, max_w = max_size
        self.register_buffer(
            "pos_embed", torch.empty(max_h, max_w, embed_dim, dtype=torch.float32), persistent=False
        )
        if self.query.device.type != "meta":
            self.reset_parameters_and_buffers()

    def reset_parameters_and_buffers(self, std: float = 0.02) -> None:
        """(Re)build `pos_embed` and initialise the weights the official way.

        query, kv_proj and attn.out_proj: truncated normal with `std`; proj: normal with std embed_dim**-0.5;
        attn.in_proj: xavier uniform; biases 0; LayerNorms 1/0. Uses `transformers.initialization`, so tensors
        already loaded from a checkpoint (flagged `_is_hf_initialized`) are left untouched.
        """
        max_h, max_w, _ = self.pos_embed.shape
        init.copy_(self.pos_embed, get_2d_sincos_pos_embed(self.embed_dim, max_h, max_w))
        init.trunc_normal_(self.query, std=std)
        init.normal_(self.proj, std=self.embed_dim**-0.5)
        init.trunc_normal_(self.kv_proj.weight, std=std)
        init.xavier_uniform_(self.attn.in_proj_weight)
        init.zeros_(self.attn.in_proj_bias)
        init.trunc_normal_(self.attn.out_proj.weight, std=std)
        init.zeros_(self.attn.out_proj.bias)
        for norm in (self.ln_q, self.ln_kv, self.ln_post):
            init.ones_(norm.weight)
            init.zeros_(norm.bias)

    def _ensure_pos_embed(self, height: int, width: int) -> None:
        """Grow the cached table (never shrink) so that it covers a height x width slice."""
        max_h, max_w, _ = self.pos_embed.shape
        if height <= max_h and width <= max_w:
            return
        new_h, new_w = max(height, max_h), max(width, max_w)
        table = get_2d_sincos_pos_embed(self.embed_dim, new_h, new_w)
        self.register_buffer("pos_embed", table.to(self.pos_embed.device), persistent=False)

    def _validate(self, x: torch.Tensor, tgt_sizes: torch.Tensor, patch_mask: torch.Tensor | None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.kv_dim:
            raise ResamplerInputError(f"x must have shape [N, L, {self.kv_dim}], got {tuple(x.shape)}")
        if tgt_sizes.dim() != 2 or tgt_sizes.shape != (x.shape[0], 2) or tgt_sizes.is_floating_point():
            raise ResamplerInputError(
                f"tgt_sizes must be an integer tensor of shape [{x.shape[0]}, 2], got "
                f"{tuple(tgt_sizes.shape)} {tgt_sizes.dtype}"
            )
        if tgt_sizes.numel() and bool((tgt_sizes < 1).any()):
            raise ResamplerInputError(f"every slice needs h, w >= 1 patches, got tgt_sizes={tgt_sizes.tolist()}")
        num_patches = (tgt_sizes[:, 0] * tgt_sizes[:, 1]).to(torch.long)
        if num_patches.numel() and int(num_patches.max()) > x.shape[1]:
            raise ResamplerInputError(
                f"tgt_sizes={tgt_sizes.tolist()} needs more patches than x holds (L={x.shape[1]})"
            )
        derived_mask = torch.arange(x.shape[1], device=x.device)[None, :] < num_patches.to(x.device)[:, None]
        if patch_mask is not None:
            if patch_mask.shape != derived_mask.shape or patch_mask.dtype != torch.bool:
                raise ResamplerInputError(
                    f"patch_mask must be a bool tensor of shape {tuple(derived_mask.shape)}, got "
                    f"{tuple(patch_mask.shape)} {patch_mask.dtype}"
                )
            if not torch.equal(patch_mask.to(x.device), derived_mask):
                raise ResamplerInputError(
                    "patch_mask must mark exactly the first h*w positions of each slice as real (True)"
                )
        return derived_mask

    def key_positions(self, tgt_sizes: torch.Tensor, length: int, device: torch.device, dtype: torch.dtype):
        """[N, length, embed_dim]: each slice's table[:h, :w] flattened row-major, zero-padded to `length`."""
        sizes = tgt_sizes.tolist()
        if sizes:
            self._ensure_pos_embed(max(h for h, _ in sizes), max(w for _, w in sizes))
        positions = torch.zeros(len(sizes), length, self.embed_dim, device=device, dtype=dtype)
        for row, (height, width) in enumerate(sizes):
            region = self.pos_embed[:height, :width, :].reshape(height * width, self.embed_dim)
            positions[row, : height * width] = region.to(device=device, dtype=dtype)
        return positions

    def forward(
        self, x: torch.Tensor, tgt_sizes: torch.Tensor, patch_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [N, L, kv_dim] patch features, tgt_sizes [N, 2] (h, w), patch_mask [N, L] (True = real patch,
        the first h*w of each row; derived from tgt_sizes when None) -> [N, num_queries, embed_dim]."""
        real = self._validate(x, tgt_sizes, patch_mask)
        kv = self.ln_kv(self.kv_proj(x))  # [N, L, D]
        positions = self.key_positions(tgt_sizes, x.shape[1], kv.device, kv.dtype)
        query = self.ln_q(self.query)  # [Q, D]
        batch = x.shape[0]
        # nn.MultiheadAttention is sequence-first: [len, N, D].
        attended, _ = self.attn(
            query[:, None, :].expand(-1, batch, -1),
            (kv + positions).transpose(0, 1),
            kv.transpose(0, 1),
            key_padding_mask=~real,
            need_weights=False,
        )
        return self.ln_post(attended.transpose(0, 1)) @ self.proj


__all__ = ["MiniCPMOResampler", "ResamplerInputError", "get_2d_sincos_pos_embed"]
