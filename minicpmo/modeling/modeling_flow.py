"""Token2wav flow: S3 speech tokens (25 Hz) -> 80-bin log-mel (50 Hz), offline and streaming.

``FlowDecoder`` mirrors the official ``CausalMaskedDiffWithXvec`` (its state_dict loads ``flow.pt`` as is):
token embedding -> :class:`UpsampleConformerEncoder` -> ``encoder_proj`` (= mu) -> conditional flow
matching whose velocity is a :class:`DiT`, integrated with cosine-scheduled Euler steps and
classifier-free guidance. Conditioning: a speaker embedding (L2-normalised, Linear 192->80) and the
prompt mel of the reference voice.

Streaming semantics (where the spec leaves room, this is what we chose):

- ``prepare_stream`` encodes prompt tokens + ``pre_lookahead_len`` lookahead tokens (default: the
  silence token 4218, which is also what MiniCPM prepends to every spoken turn, so the prompt block
  is exact) and runs the ODE on the prompt with ``cond = prompt mel``, only to fill the caches.
- ``stream_step`` takes ``n + pre_lookahead_len`` tokens (normally 25 + 3 = 28) and returns ``2n``
  frames; with ``last_chunk=True`` all given tokens are new and zero lookahead frames are padded.
  Later chunks use ``cond = 0``.
- A chunk attends to every cached frame plus itself (bidirectional inside the chunk); convolutions
  are causal with cached left context. So, until trimming starts, a stream equals
  :meth:`FlowDecoder.inference` with ``chunk_size=n`` (block-causal masks, prompt = block 0).
- Noise comes from the fixed buffer at the *absolute* mel-frame index (prompt included, wrapping
  after ``noise_length`` frames), which keeps that equivalence; the official code indexes by the
  current cache length instead, which differs only after trimming.
- Trimming bounds memory: after each step every attention cache keeps the prompt entries plus the
  ``stream_cache_frames`` (100) newest mel frames (50 tokens at token rate). The official code
  stores newest-first and so keeps a different subset; we keep the newest, as intended. The
  conformer's relative positions are indices in the kept window (as in the official code), the DiT
  has no positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..configuration.configuration_token2wav import FlowConfig, FlowConfigError  # noqa: F401 (FlowConfigError re-exported)
from ..errors import SpeechOutputError
from .modeling_flow_dit import DiT
from .modeling_flow_encoder import (
    ConformerStreamCache,
    UpsampleConformerEncoder,
    block_causal_mask,
    keep_prompt_and_recent,
)


class FlowInputError(SpeechOutputError):
    """Bad tokens, prompt, speaker embedding or stream usage given to FlowDecoder."""


def make_flow_noise(seed: int, channels: int = 80, length: int = 30000) -> torch.Tensor:
    """The fixed ODE start noise randn(1, channels, length) drawn from a CPU generator seeded with ``seed``.

    Equal to the official buffer when ``torch.manual_seed(seed)`` preceded its construction.
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(1, channels, length, generator=generator, device="cpu")


def cosine_time_schedule(n_timesteps: int, device=None) -> torch.Tensor:
    """t_k = 1 - cos(k/n * pi/2), k = 0..n: small steps near the noise end."""
    return 1 - torch.cos(torch.linspace(0, 1, n_timesteps + 1, device=device) * 0.5 * math.pi)


@dataclass(frozen=True)
class DiTStreamCache:
    """DiT caches for every ODE step, CFG branches stacked in the batch (cond first, then uncond).

    kv: [n_timesteps, depth, 2, H, T, 2*head_dim]; conv: [n_timesteps, depth, 2, 2*hidden, 2].
    """

    kv: torch.Tensor
    conv: torch.Tensor


class CausalFlowMatching(nn.Module):
    """Euler ODE from noise (t=0) to mel (t=1) with classifier-free guidance.

    v = (1 + r) v(x | mu, spk, cond) - r v(x | 0, 0, 0), r = ``inference_cfg_rate``; both branches run in
    one batch-2 estimator call per step.
    """

    def __init__(self, estimator: DiT, inference_cfg_rate: float):
        super().__init__()
        self.estimator = estimator
        self.inference_cfg_rate = inference_cfg_rate

    def _guided(self, velocity: torch.Tensor) -> torch.Tensor:
        cond, uncond = velocity.chunk(2, dim=0)
        return (1 + self.inference_cfg_rate) * cond - self.inference_cfg_rate * uncond

    @staticmethod
    def _with_unconditional(mu, spks, cond):
        return (
            torch.cat([mu, torch.zeros_like(mu)]),
            torch.cat([spks, torch.zeros_like(spks)]),
            torch.cat([cond, torch.zeros_like(cond)]),
        )

    def forward(self, mu, spks, cond, noise, n_timesteps: int, attention_mask: torch.Tensor | None = None):
        """Whole sequence. mu, cond, noise: [1, out, T]; spks: [1, out]; mask: bool [T, T] -> mel [1, out, T]."""
        mu2, spks2, cond2 = self._with_unconditional(mu, spks, cond)
        times = cosine_time_schedule(n_timesteps, device=mu.device)
        x = noise
        for k in range(n_timesteps):
            t = times[k].expand(2).to(mu.dtype)
            velocity = self.estimator(torch.cat([x, x]), mu2, t, spks2, cond2, attention_mask)
            x = x + (times[k + 1] - times[k]).to(x.dtype) * self._guided(velocity)
        return x

    def forward_chunk(self, mu, spks, cond, noise, n_timesteps: int, cache: DiTStreamCache | None):
        """One chunk; ODE step k attends to the step-k keys/values of earlier chunks -> (mel, new cache)."""
        mu2, spks2, cond2 = self._with_unconditional(mu, spks, cond)
        times = cosine_time_schedule(n_timesteps, device=mu.device)
        x = noise
        kv_steps, conv_steps = [], []
        for k in range(n_timesteps):
            t = times[k].expand(2).to(mu.dtype)
            velocity, kv, conv = self.estimator.forward_chunk(
                torch.cat([x, x]),
                mu2,
                t,
                spks2,
                cond2,
                kv_cache=None if cache is None else cache.kv[k],
                conv_cache=None if cache is None else cache.conv[k],
            )
            kv_steps.append(kv)
            conv_steps.append(conv)
            x = x + (times[k + 1] - times[k]).to(x.dtype) * self._guided(velocity)
        return x, DiTStreamCache(kv=torch.stack(kv_steps), conv=torch.stack(conv_steps))


@dataclass(frozen=True)
class FlowStreamState:
    """Everything a stream carries between chunks; ``stream_step`` returns a new one and never mutates it.

    frame_offset: mel frames produced so far including the prompt (indexes the fixed noise).
    """

    speaker: torch.Tensor  # [1, output_size], projected speaker embedding
    encoder_cache: ConformerStreamCache
    estimator_cache: DiTStreamCache
    n_timesteps: int
    prompt_tokens: int
    prompt_frames: int
    token_offset: int
    frame_offset: int
    finished: bool = False


class FlowDecoder(nn.Module):
    """Speech tokens + reference voice -> mel. Submodule names match the official ``flow.`` state_dict."""

    def __init__(self, config: FlowConfig | None = None):
        super().__init__()
        config = config if config is not None else FlowConfig()
        self.config = config
        self.input_embedding = nn.Embedding(config.vocab_size, config.input_size)
        self.spk_embed_affine_layer = nn.Linear(config.spk_embed_dim, config.output_size)
        self.encoder = UpsampleConformerEncoder(
            hidden_size=config.encoder_output_size,
            num_heads=config.encoder_attention_heads,
            intermediate_size=config.encoder_linear_units,
            num_blocks=config.encoder_num_blocks,
            num_up_blocks=config.encoder_num_up_blocks,
            pre_lookahead_len=config.pre_lookahead_len,
            up_stride=config.up_stride,
        )
        self.encoder_proj = nn.Linear(config.encoder_output_size, config.output_size)
        estimator = DiT(
            in_channels=config.dit_in_channels,
            out_channels=config.dit_out_channels,
            hidden_size=config.dit_hidden_size,
            depth=config.dit_depth,
            num_heads=config.dit_num_heads,
            head_dim=config.dit_head_dim,
            mlp_ratio=config.dit_mlp_ratio,
            time_embed_dim=config.dit_time_embed_dim,
        )
        self.decoder = CausalFlowMatching(estimator, config.inference_cfg_rate)
        noise = make_flow_noise(config.noise_seed, config.output_size, config.noise_length)
        self.register_buffer("rand_noise", noise, persistent=False)

    # ------------------------------------------------------------------ helpers
    def reset_noise(self, seed: int | None = None) -> None:
        """Re-create the fixed noise (needed after meta-device construction, e.g. in ``_init_weights``)."""
        seed = self.config.noise_seed if seed is None else seed
        noise = make_flow_noise(seed, self.config.output_size, self.config.noise_length)
        device = self.spk_embed_affine_layer.weight.device
        dtype = self.spk_embed_affine_layer.weight.dtype
        self.rand_noise = noise.to(device="cpu" if device.type == "meta" else device, dtype=dtype)

    @property
    def _device(self) -> torch.device:
        return self.input_embedding.weight.device

    @property
    def _dtype(self) -> torch.dtype:
        return self.input_embedding.weight.dtype

    def _noise(self, start: int, length: int) -> torch.Tensor:
        if self.rand_noise.is_meta:
            raise RuntimeError("FlowDecoder.rand_noise is on the meta device; call reset_noise() after loading")
        index = torch.arange(start, start + length, device=self.rand_noise.device) % self.rand_noise.shape[-1]
        return self.rand_noise.index_select(2, index).to(device=self._device, dtype=self._dtype)

    def _check_tokens(self, name: str, tokens, min_length: int, max_length: int | None = None) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor):
            raise FlowInputError(f"{name} must be a torch.Tensor of token ids, got {type(tokens).__name__}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise FlowInputError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")
        if tokens.dim() != 2 or tokens.shape[0] != 1:
            raise FlowInputError(f"{name} must have shape [1, T] (batch 1), got {list(tokens.shape)}")
        length = tokens.shape[1]
        if length < min_length or (max_length is not None and length > max_length):
            bound = f"between {min_length} and {max_length}" if max_length is not None else f"at least {min_length}"
            raise FlowInputError(f"{name} must hold {bound} tokens, got {length}")
        if length and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise FlowInputError(
                f"{name} holds ids outside [0, {self.config.vocab_size}): "
                f"min {int(tokens.min())}, max {int(tokens.max())}"
            )
        return tokens.to(device=self._device, dtype=torch.long)

    def embed_speaker(self, speaker_embedding) -> torch.Tensor:
        """[1, spk_embed_dim] x-vector -> L2-normalised -> Linear -> [1, output_size]."""
        dim = self.config.spk_embed_dim
        if not isinstance(speaker_embedding, torch.Tensor) or not speaker_embedding.dtype.is_floating_point:
            raise FlowInputError(f"speaker_embedding must be a float torch.Tensor of shape [1, {dim}]")
        if speaker_embedding.dim() != 2 or speaker_embedding.shape != (1, dim):
            raise FlowInputError(f"speaker_embedding must have shape [1, {dim}], got {list(speaker_embedding.shape)}")
        if not torch.isfinite(speaker_embedding).all():
            raise FlowInputError("speaker_embedding contains NaN or inf")
        spk = F.normalize(speaker_embedding.to(device=self._device, dtype=self._dtype), dim=1)
        return self.spk_embed_affine_layer(spk)

    def _prompt_cond(self, prompt_mel, num_prompt_tokens: int) -> torch.Tensor:
        """[1, T_mel, out] prompt mel -> [1, out, up_stride * T_p]: replicate-padded or cut to the token length."""
        bins = self.config.output_size
        if not isinstance(prompt_mel, torch.Tensor) or not prompt_mel.dtype.is_floating_point:
            raise FlowInputError(f"prompt_mel must be a float torch.Tensor of shape [1, T, {bins}]")
        if prompt_mel.dim() != 3 or prompt_mel.shape[0] != 1 or prompt_mel.shape[2] != bins or prompt_mel.shape[1] == 0:
            raise FlowInputError(f"prompt_mel must have shape [1, T>0, {bins}], got {list(prompt_mel.shape)}")
        if not torch.isfinite(prompt_mel).all():
            raise FlowInputError("prompt_mel contains NaN or inf")
        frames = num_prompt_tokens * self.config.up_stride
        mel = prompt_mel.to(device=self._device, dtype=self._dtype).transpose(1, 2)
        if mel.shape[-1] < frames:
            mel = F.pad(mel, (0, frames - mel.shape[-1]), mode="replicate")
        return mel[..., :frames]

    def _check_steps(self, n_timesteps: int | None) -> int:
        n = self.config.n_timesteps if n_timesteps is None else n_timesteps
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise FlowInputError(f"n_timesteps must be a positive int, got {n!r}")
        return n

    # ------------------------------------------------------------------ offline
    @torch.no_grad()
    def inference(
        self,
        tokens: torch.Tensor,
        prompt_tokens: torch.Tensor,
        prompt_mel: torch.Tensor,
        speaker_embedding: torch.Tensor,
        n_timesteps: int | None = None,
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """tokens [1, T], prompt_tokens [1, T_p], prompt_mel [1, 2 T_p, 80], speaker_embedding [1, 192]
        -> mel [1, 80, 2 T].

        ``chunk_size=None`` attends over the whole sequence (official offline path); ``chunk_size=n``
        uses block-causal attention with the prompt as block 0 and n-token blocks after it, the exact
        full-sequence counterpart of streaming with ``n`` new tokens per chunk.
        """
        tokens = self._check_tokens("tokens", tokens, 1)
        prompt_tokens = self._check_tokens("prompt_tokens", prompt_tokens, 1)
        steps = self._check_steps(n_timesteps)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise FlowInputError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        spk = self.embed_speaker(speaker_embedding)
        num_prompt, num_new = prompt_tokens.shape[1], tokens.shape[1]
        prompt_cond = self._prompt_cond(prompt_mel, num_prompt)

        block_ids = None
        if chunk_size is not None:
            block_ids = torch.cat(
                [
                    torch.zeros(num_prompt, dtype=torch.long, device=self._device),
                    1 + torch.arange(num_new, device=self._device) // chunk_size,
                ]
            )
        embedded = self.input_embedding(torch.cat([prompt_tokens, tokens], dim=1))
        mu = self.encoder_proj(self.encoder(embedded, block_ids)).transpose(1, 2)
        cond = torch.zeros_like(mu)
        cond[..., : prompt_cond.shape[-1]] = prompt_cond
        mask = None
        if block_ids is not None:
            mask = block_causal_mask(block_ids.repeat_interleave(self.config.up_stride))
        mel = self.decoder(mu, spk, cond, self._noise(0, mu.shape[-1]), steps, mask)
        return mel[..., prompt_cond.shape[-1] :]

    # ------------------------------------------------------------------ streaming
    @torch.no_grad()
    def prepare_stream(
        self,
        prompt_tokens: torch.Tensor,
        prompt_mel: torch.Tensor,
        speaker_embedding: torch.Tensor,
        n_timesteps: int | None = None,
        lookahead_tokens: torch.Tensor | None = None,
    ) -> FlowStreamState:
        """Encode the reference voice and fill every cache. lookahead_tokens [1, 3] default: silence x3."""
        prompt_tokens = self._check_tokens("prompt_tokens", prompt_tokens, 1)
        lookahead = self.config.pre_lookahead_len
        if lookahead_tokens is None:
            lookahead_tokens = torch.full((1, lookahead), self.config.silence_token_id, dtype=torch.long)
        lookahead_tokens = self._check_tokens("lookahead_tokens", lookahead_tokens, lookahead, lookahead)
        steps = self._check_steps(n_timesteps)
        spk = self.embed_speaker(speaker_embedding)
        cond = self._prompt_cond(prompt_mel, prompt_tokens.shape[1])

        embedded = self.input_embedding(torch.cat([prompt_tokens, lookahead_tokens], dim=1))
        hidden, encoder_cache = self.encoder.forward_chunk(embedded, None, last_chunk=False)
        mu = self.encoder_proj(hidden).transpose(1, 2)
        _, estimator_cache = self.decoder.forward_chunk(mu, spk, cond, self._noise(0, mu.shape[-1]), steps, None)
        return FlowStreamState(
            speaker=spk,
            encoder_cache=encoder_cache,
            estimator_cache=estimator_cache,
            n_timesteps=steps,
            prompt_tokens=prompt_tokens.shape[1],
            prompt_frames=mu.shape[-1],
            token_offset=prompt_tokens.shape[1],
            frame_offset=mu.shape[-1],
        )

    @torch.no_grad()
    def stream_step(
        self, tokens_chunk: torch.Tensor, state: FlowStreamState, last_chunk: bool = False
    ) -> tuple[torch.Tensor, FlowStreamState]:
        """tokens_chunk [1, n + 3] (n new + 3 lookahead; all n new when ``last_chunk``) -> (mel [1, 80, 2n], state)."""
        if not isinstance(state, FlowStreamState):
            raise FlowInputError(f"state must be a FlowStreamState from prepare_stream, got {type(state).__name__}")
        if state.finished:
            raise FlowInputError("this stream already received its last_chunk; call prepare_stream for a new one")
        lookahead = self.config.pre_lookahead_len
        tokens = self._check_tokens(
            "tokens_chunk (last chunk)" if last_chunk else f"tokens_chunk (new + {lookahead} lookahead)",
            tokens_chunk,
            1 if last_chunk else lookahead + 1,
        )
        num_new = tokens.shape[1] - (0 if last_chunk else lookahead)

        embedded = self.input_embedding(tokens)
        hidden, encoder_cache = self.encoder.forward_chunk(embedded, state.encoder_cache, last_chunk)
        mu = self.encoder_proj(hidden).transpose(1, 2)
        noise = self._noise(state.frame_offset, mu.shape[-1])
        mel, estimator_cache = self.decoder.forward_chunk(
            mu, state.speaker, torch.zeros_like(mu), noise, state.n_timesteps, state.estimator_cache
        )

        window = self.config.stream_cache_frames
        token_window = window // self.config.up_stride
        encoder_cache = ConformerStreamCache(
            token_kv=keep_prompt_and_recent(encoder_cache.token_kv, state.prompt_tokens, token_window),
            mel_kv=keep_prompt_and_recent(encoder_cache.mel_kv, state.prompt_frames, window),
            lookahead_conv=encoder_cache.lookahead_conv,
            upsample_conv=encoder_cache.upsample_conv,
        )
        estimator_cache = DiTStreamCache(
            kv=keep_prompt_and_recent(estimator_cache.kv, state.prompt_frames, window),
            conv=estimator_cache.conv,
        )
        new_state = replace(
            state,
            encoder_cache=encoder_cache,
            estimator_cache=estimator_cache,
            token_offset=state.token_offset + num_new,
            frame_offset=state.frame_offset + mu.shape[-1],
            finished=bool(last_chunk),
        )
        return mel, new_state
