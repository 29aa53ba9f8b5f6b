"""Token encoder of the token2wav flow: a streaming upsampling conformer.

Speech tokens (25 Hz) become the flow's conditioning ``mu`` at mel rate (50 Hz):

    linear embed -> pre-lookahead conv -> N conformer layers (token rate)
    -> x2 nearest upsample + causal conv -> re-embed -> M conformer layers (mel rate) -> LayerNorm

Attention is ESPnet-style relative-position self-attention ("rel_selfattn" with "rel_pos_espnet"
encodings). Everything is causal except attention, which a block-causal mask (offline) or a
key/value cache (streaming) restricts, so a chunked stream and a masked full-sequence pass agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class CausalConv1d(nn.Conv1d):
    """Conv1d that only looks at the current and the ``kernel_size - 1`` previous frames.

    Offline it left-pads with zeros; in streaming the caller passes the previous frames as ``cache``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__(in_channels, out_channels, kernel_size)
        self.context = kernel_size - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.context, 0)))

    def stream(self, x: torch.Tensor, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, C, T]; cache: [B, C, context] or None (= zeros, i.e. start of sequence)."""
        if cache is None:
            cache = x.new_zeros(x.shape[0], x.shape[1], self.context)
        x = torch.cat([cache, x], dim=2)
        return super().forward(x), x[..., x.shape[-1] - self.context :]


def block_causal_mask(block_ids: torch.Tensor) -> torch.Tensor:
    """Bool [T, T] mask (True = may attend): a frame sees every frame of its own and earlier blocks.

    This is the full-sequence equivalent of chunked streaming where a chunk attends to all cached
    frames plus itself, bidirectionally inside the chunk.
    """
    return block_ids[None, :] <= block_ids[:, None]


def relative_sinusoids(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """ESPnet relative positional encodings: [sin(r w_0), cos(r w_0), sin(r w_1), ...], w_i = 10000^(-2i/dim)."""
    even = torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device)
    inv_freq = torch.exp(even * (-math.log(10000.0) / dim))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)


class LinearEmbed(nn.Module):
    """Linear -> LayerNorm, then scaled by sqrt(d) (the ESPnet positional-encoding input scale)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim, eps=1e-5))
        self.scale = math.sqrt(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x) * self.scale


class RelPositionSelfAttention(nn.Module):
    """Transformer-XL style attention with learned biases ``pos_bias_u`` (content) and ``pos_bias_v`` (position).

    score(i, j) = [(q_i + u) . k_j + (q_i + v) . W_pos e(i - j)] / sqrt(d_k), where e is the sinusoid of
    the relative distance between query i and key j. Queries are the last ``T_q`` frames of the key
    window (cache + chunk), so positions are indices inside that window.
    """

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.linear_q = nn.Linear(hidden_size, hidden_size)
        self.linear_k = nn.Linear(hidden_size, hidden_size)
        self.linear_v = nn.Linear(hidden_size, hidden_size)
        self.linear_out = nn.Linear(hidden_size, hidden_size)
        self.linear_pos = nn.Linear(hidden_size, hidden_size, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(num_heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.empty(num_heads, self.head_dim))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def _position_scores(self, q_v: torch.Tensor, key_len: int) -> torch.Tensor:
        """(q + v) . W_pos e(i - j) for every query i and key j: [B, H, T_q, T_k]."""
        batch, heads, query_len, _ = q_v.shape
        # relative distances that occur, largest first: key_len - 1 ... -(query_len - 1)
        distances = torch.arange(key_len - 1, -query_len, -1, device=q_v.device)
        pos = self.linear_pos(relative_sinusoids(distances, heads * self.head_dim).to(q_v.dtype))
        pos = pos.view(-1, heads, self.head_dim).transpose(0, 1)  # [H, L, d_k]
        scores = torch.matmul(q_v, pos.transpose(-1, -2))  # [B, H, T_q, L]
        # query i sits at window index key_len - query_len + i; distance to key j -> column query_len - 1 - i + j
        rows = torch.arange(query_len, device=q_v.device)[:, None]
        cols = torch.arange(key_len, device=q_v.device)[None, :]
        index = (query_len - 1 - rows + cols).expand(batch, heads, query_len, key_len)
        return scores.gather(-1, index)

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv_cache: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, C]; attention_mask: bool [T_q, T_k] (True = attend); kv_cache: [B, H, T_c, 2 d_k].

        Returns the output [B, T, C] and the new key/value window [B, H, T_c + T, 2 d_k].
        """
        q = self._heads(self.linear_q(x))
        k = self._heads(self.linear_k(x))
        v = self._heads(self.linear_v(x))
        if kv_cache is not None:
            k_cache, v_cache = kv_cache.split(self.head_dim, dim=-1)
            k = torch.cat([k_cache, k], dim=2)
            v = torch.cat([v_cache, v], dim=2)
        new_cache = torch.cat([k, v], dim=-1)

        scale = 1.0 / math.sqrt(self.head_dim)
        q_u = q + self.pos_bias_u[None, :, None, :]
        q_v = q + self.pos_bias_v[None, :, None, :]
        bias = self._position_scores(q_v, k.shape[2]) * scale
        if attention_mask is not None:
            bias = bias.masked_fill(~attention_mask, float("-inf"))
        out = F.scaled_dot_product_attention(q_u, k, v, attn_mask=bias, scale=scale)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.linear_out(out), new_cache


class PositionwiseFeedForward(nn.Module):
    """w_2(SiLU(w_1 x)): the conformer feed-forward (ESPnet "swish" activation)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w_1 = nn.Linear(hidden_size, intermediate_size)
        self.w_2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerLayer(nn.Module):
    """Pre-norm conformer layer without convolution module: x + MHA(LN x), then x + FFN(LN x)."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int):
        super().__init__()
        self.self_attn = RelPositionSelfAttention(hidden_size, num_heads)
        self.feed_forward = PositionwiseFeedForward(hidden_size, intermediate_size)
        self.norm_mha = nn.LayerNorm(hidden_size, eps=1e-12)
        self.norm_ff = nn.LayerNorm(hidden_size, eps=1e-12)

    def forward(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, kv_cache: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        attn, new_cache = self.self_attn(self.norm_mha(x), attention_mask, kv_cache)
        x = x + attn
        x = x + self.feed_forward(self.norm_ff(x))
        return x, new_cache


class PreLookaheadLayer(nn.Module):
    """Gives each token a view of the next ``lookahead`` tokens.

    conv1 (kernel lookahead+1) over frames t..t+lookahead -> leaky ReLU -> causal conv2 (kernel 3) -> + input.
    Consumes ``lookahead`` more input frames than it outputs; the sequence end is padded with zeros.
    """

    def __init__(self, channels: int, lookahead: int):
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(channels, channels, lookahead + 1)
        self.conv2 = CausalConv1d(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Offline: x [B, T, C] -> [B, T, C] (zero lookahead after the last frame)."""
        h = F.leaky_relu(self.conv1(F.pad(x.transpose(1, 2), (0, self.lookahead))))
        return self.conv2(h).transpose(1, 2) + x

    def stream(self, x: torch.Tensor, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T + lookahead, C] -> ([B, T, C], cache of the last 2 conv1 outputs [B, C, 2])."""
        h = F.leaky_relu(self.conv1(x.transpose(1, 2)))
        h, new_cache = self.conv2.stream(h, cache)
        return h.transpose(1, 2) + x[:, : x.shape[1] - self.lookahead], new_cache


class UpsampleLayer(nn.Module):
    """Nearest-neighbour upsampling by ``stride`` followed by a causal conv of kernel 2*stride+1."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = CausalConv1d(channels, channels, 2 * stride + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, T] -> [B, C, stride*T]."""
        return self.conv(x.repeat_interleave(self.stride, dim=2))

    def stream(self, x: torch.Tensor, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv.stream(x.repeat_interleave(self.stride, dim=2), cache)


@dataclass(frozen=True)
class ConformerStreamCache:
    """Streaming state of :class:`UpsampleConformerEncoder` (batch 1, newest frames last).

    token_kv: [num_blocks, B, H, T_tok, 2*d_k] keys|values of the token-rate layers.
    mel_kv: [num_up_blocks, B, H, T_mel, 2*d_k] keys|values of the mel-rate layers.
    lookahead_conv: [B, C, 2] last conv1 outputs of the pre-lookahead layer.
    upsample_conv: [B, C, 2*stride] last upsampled frames before the up-conv.
    """

    token_kv: torch.Tensor
    mel_kv: torch.Tensor
    lookahead_conv: torch.Tensor
    upsample_conv: torch.Tensor


def keep_prompt_and_recent(cache: torch.Tensor, prompt_len: int, recent: int) -> torch.Tensor:
    """Bound a time axis (dim -2): keep the first ``prompt_len`` entries and the ``recent`` newest ones."""
    length = cache.shape[-2]
    if length <= prompt_len + recent:
        return cache
    return torch.cat([cache[..., :prompt_len, :], cache[..., length - recent :, :]], dim=-2)


class UpsampleConformerEncoder(nn.Module):
    """Token-rate conformer, x``up_stride`` upsampling, mel-rate conformer (module names follow flow.pt)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        num_blocks: int,
        num_up_blocks: int,
        pre_lookahead_len: int,
        up_stride: int,
    ):
        super().__init__()
        self.up_stride = up_stride
        self.pre_lookahead_len = pre_lookahead_len
        self.embed = LinearEmbed(hidden_size, hidden_size)
        self.pre_lookahead_layer = PreLookaheadLayer(hidden_size, pre_lookahead_len)
        self.encoders = nn.ModuleList(
            ConformerLayer(hidden_size, num_heads, intermediate_size) for _ in range(num_blocks)
        )
        self.up_layer = UpsampleLayer(hidden_size, up_stride)
        self.up_embed = LinearEmbed(hidden_size, hidden_size)
        self.up_encoders = nn.ModuleList(
            ConformerLayer(hidden_size, num_heads, intermediate_size) for _ in range(num_up_blocks)
        )
        self.after_norm = nn.LayerNorm(hidden_size, eps=1e-5)

    def forward(self, xs: torch.Tensor, block_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Whole sequence. xs: token embeddings [B, T, C] -> [B, up_stride*T, C].

        block_ids: optional [T] chunk index per token; attention is then block-causal at both rates
        (None = full bidirectional attention, the official offline behaviour).
        """
        h = self.pre_lookahead_layer(self.embed(xs))
        mask = None if block_ids is None else block_causal_mask(block_ids)
        for layer in self.encoders:
            h, _ = layer(h, mask)
        h = self.up_layer(h.transpose(1, 2)).transpose(1, 2)
        h = self.up_embed(h)
        if block_ids is not None:
            mask = block_causal_mask(block_ids.repeat_interleave(self.up_stride))
        for layer in self.up_encoders:
            h, _ = layer(h, mask)
        return self.after_norm(h)

    def forward_chunk(
        self, xs: torch.Tensor, cache: ConformerStreamCache | None, last_chunk: bool = False
    ) -> tuple[torch.Tensor, ConformerStreamCache]:
        """One streaming chunk. xs: [B, T + pre_lookahead_len, C] token embeddings (or [B, T, C] when
        ``last_chunk``, which pads zero lookahead frames) -> ([B, up_stride*T, C], new cache).

        The chunk attends to every cached frame plus itself; ``cache`` is not modified.
        """
        h = self.embed(xs)
        if last_chunk:
            h = F.pad(h, (0, 0, 0, self.pre_lookahead_len))
        h, lookahead_conv = self.pre_lookahead_layer.stream(h, None if cache is None else cache.lookahead_conv)
        token_kv = []
        for i, layer in enumerate(self.encoders):
            h, kv = layer(h, kv_cache=None if cache is None else cache.token_kv[i])
            token_kv.append(kv)
        h, upsample_conv = self.up_layer.stream(h.transpose(1, 2), None if cache is None else cache.upsample_conv)
        h = self.up_embed(h.transpose(1, 2))
        mel_kv = []
        for i, layer in enumerate(self.up_encoders):
            h, kv = layer(h, kv_cache=None if cache is None else cache.mel_kv[i])
            mel_kv.append(kv)
        new_cache = ConformerStreamCache(
            token_kv=torch.stack(token_kv),
            mel_kv=torch.stack(mel_kv),
            lookahead_conv=lookahead_conv,
            upsample_conv=upsample_conv,
        )
        return self.after_norm(h), new_cache
