"""DiT velocity estimator of the token2wav flow (module names follow flow.pt ``decoder.estimator``).

Input is the channel concatenation [x_t, mu, speaker, cond] (4 x mel bins); conditioning on the ODE
time goes through adaLN-zero. Each block: attention (q/k LayerNorm, no positional encoding) ->
causal conv block -> GELU(tanh) MLP, each with its own shift/scale/gate (9 modulation vectors).
The only non-causal part is attention, so streaming needs a key/value cache plus 2-frame conv caches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .modeling_flow_encoder import CausalConv1d


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of t*1000 ordered [cos, sin], then Linear -> SiLU -> Linear."""

    def __init__(
        self, hidden_size: int, frequency_dim: int = 256, time_scale: float = 1000.0, max_period: float = 10000.0
    ):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.time_scale = time_scale
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def sinusoids(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = (t.to(torch.float32) * self.time_scale)[:, None] * freqs[None, :]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: [B] in [0, 1] -> [B, hidden]."""
        return self.mlp(self.sinusoids(t).to(self.mlp[0].weight.dtype))


class DiTAttention(nn.Module):
    """Multi-head attention with per-head LayerNorm on q and k and no positional encoding."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.to_q = nn.Linear(hidden_size, inner)
        self.to_k = nn.Linear(hidden_size, inner)
        self.to_v = nn.Linear(hidden_size, inner)
        self.q_norm = nn.LayerNorm(head_dim)
        self.k_norm = nn.LayerNorm(head_dim)
        self.proj = nn.Linear(inner, hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, kv_cache: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, C]; attention_mask: bool [T_q, T_k]; kv_cache: [B, H, T_c, 2*head_dim] (keys|values).

        Keys are order-free (no positions), so the cache is a plain set of past frames.
        """
        q = self.q_norm(self._heads(self.to_q(x)))
        k = self.k_norm(self._heads(self.to_k(x)))
        v = self._heads(self.to_v(x))
        if kv_cache is not None:
            k_cache, v_cache = kv_cache.split(self.head_dim, dim=-1)
            k = torch.cat([k_cache, k], dim=2)
            v = torch.cat([v_cache, v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.proj(out), torch.cat([k, v], dim=-1)


class DiTMlp(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class ChannelsFirst(nn.Module):
    """[B, T, C] <-> [B, C, T]; a parameter-free slot that keeps the checkpoint's ``block.{i}`` indices."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class CausalConvBlock(nn.Module):
    """CausalConv(k) -> LayerNorm -> Mish -> CausalConv(k) on [B, T, C].

    ``block`` indices 1, 3 and 6 hold the weights, as in the official checkpoint.
    """

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.channels = channels
        self.block = nn.Sequential(
            ChannelsFirst(),
            CausalConv1d(channels, channels, kernel_size),
            ChannelsFirst(),
            nn.LayerNorm(channels),
            nn.Mish(),
            ChannelsFirst(),
            CausalConv1d(channels, channels, kernel_size),
            ChannelsFirst(),
        )

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, C]; cache: [B, 2C, k-1] (inputs of conv 1 | conv 2) -> (out, new cache)."""
        cache1, cache2 = (None, None) if cache is None else cache.split(self.channels, dim=1)
        first, second = self.block[1], self.block[6]
        h, new1 = first.stream(x.transpose(1, 2), cache1)
        h = self.block[4](self.block[3](h.transpose(1, 2)))
        h, new2 = second.stream(h.transpose(1, 2), cache2)
        return h.transpose(1, 2), torch.cat([new1, new2], dim=1)


class DiTBlock(nn.Module):
    """adaLN-zero block; modulation chunks are ordered (shift, scale, gate) x (attention, MLP, conv)."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = DiTAttention(hidden_size, num_heads, head_dim)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = DiTMlp(hidden_size, int(hidden_size * mlp_ratio))
        self.norm3 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.conv = CausalConvBlock(hidden_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 9 * hidden_size))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv_cache: torch.Tensor | None = None,
        conv_cache: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, T, C]; c: [B, 1, C] time embedding -> (x, new kv cache, new conv cache)."""
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_conv, scale_conv, gate_conv) = (
            self.adaLN_modulation(c).chunk(9, dim=-1)
        )
        attn, new_kv = self.attn(modulate(self.norm1(x), shift_msa, scale_msa), attention_mask, kv_cache)
        x = x + gate_msa * attn
        conv, new_conv = self.conv(modulate(self.norm3(x), shift_conv, scale_conv), conv_cache)
        x = x + gate_conv * conv
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x, new_kv, new_conv


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Velocity field v(x_t, t | mu, speaker, cond) on mel frames."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        head_dim: int,
        mlp_ratio: float,
        time_embed_dim: int = 256,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.t_embedder = TimestepEmbedder(hidden_size, time_embed_dim)
        self.in_proj = nn.Linear(in_channels, hidden_size)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, head_dim, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, out_channels)

    def _inputs(self, x, mu, t, spks, cond):
        spks = spks[:, :, None].expand(-1, -1, x.shape[-1])
        h = self.in_proj(torch.cat([x, mu, spks, cond], dim=1).transpose(1, 2))
        return h, self.t_embedder(t)[:, None, :]

    def forward(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Whole sequence. x, mu, cond: [B, out, T]; t: [B]; spks: [B, out]; mask: bool [T, T] -> [B, out, T]."""
        h, c = self._inputs(x, mu, t, spks, cond)
        for block in self.blocks:
            h, _, _ = block(h, c, attention_mask)
        return self.final_layer(h, c).transpose(1, 2)

    def forward_chunk(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        kv_cache: torch.Tensor | None = None,
        conv_cache: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One streaming chunk that attends to all cached frames plus itself.

        kv_cache: [depth, B, H, T_c, 2*head_dim]; conv_cache: [depth, B, 2*hidden, 2] (None at the start).
        Returns (velocity [B, out, T], new kv cache with T_c + T frames, new conv cache).
        """
        h, c = self._inputs(x, mu, t, spks, cond)
        new_kv, new_conv = [], []
        for i, block in enumerate(self.blocks):
            h, kv, conv = block(
                h,
                c,
                kv_cache=None if kv_cache is None else kv_cache[i],
                conv_cache=None if conv_cache is None else conv_cache[i],
            )
            new_kv.append(kv)
            new_conv.append(conv)
        return self.final_layer(h, c).transpose(1, 2), torch.stack(new_kv), torch.stack(new_conv)
