"""Audio tower of MiniCPM-o 4.5: chunk-streaming Whisper-medium encoder (`apm.*`), MLP projector
(`audio_projection_layer.*`) and 5x average pooling, i.e. 100 mel frames/s -> 50 encoder frames/s -> 10 LLM tokens/s.

Why not transformers' `WhisperEncoder`: it insists on exactly 3000 mel frames and has no KV cache. We keep its
building blocks (`WhisperEncoderLayer`, `WhisperAttention`, the attention interface, `sinusoids`) and add the two
things MiniCPM-o needs:

* offline (chat/batch) encoding with a **block-causal chunk mask**: encoder frame i sees every real frame up to the
  end of its own `chunk_frames`-long chunk (1 s = 50 frames), with unlimited left context;
* **streaming**: a pure `step()` that encodes one chunk against a KV cache of everything seen so far (no mask), with
  positions continuing where the cache ends, and a reset when the cache would run past `max_source_positions`.

Conv seams. conv1 (k3 s1 p1) and conv2 (k3 s2 p1) give every encoder frame a receptive field of mel frames
[2j-2, 2j+2]: at a chunk seam the first frame of a chunk needs the last 2 mel frames of the previous chunk and the
last frame needs the first mel frame of the next one. Offline, the conv runs over the whole audio and sees both.
The official duplex path reproduces that in streaming by sending each 1-s chunk with redundant mel frames on both
sides and dropping the surplus conv outputs; `step()` does the same: it keeps the last 2 raw mel frames of the
previous chunk in the state (left context) and takes the first frame(s) of the next chunk as `lookahead_features`
(right context). With both, streaming equals the offline chunked encoding exactly. Without lookahead (the bare
official `get_audio_embedding_streaming`, or the last chunk of a stream) the conv zero-pads the right edge, which is
what the offline path does at the true end of the audio.

Padding. Batched offline input is right-padded; padded mel frames are zeroed before conv1 and conv1 outputs past the
real end are zeroed before conv2, so the real frames of a padded item equal those of the same item alone (the
official code lets padding leak into the last frame through the conv; we keep the unpadded behaviour).
"""

from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers import WhisperConfig
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer, sinusoids

from ..audio_utils import encoder_frames_from_mel_frames, frames_to_token_count  # noqa: F401 (re-exported)
from ..errors import AudioInputError
from .modeling_projector import MultiModalProjector


MEL_FRAMES_PER_SECOND = 100
ENCODER_FRAMES_PER_SECOND = 50
# Encoder frame j reads mel frames [2j-2, 2j+2]: 2 frames of left context, 1 of right context at a chunk seam.
CONV_LEFT_CONTEXT_MEL_FRAMES = 2
CONV_RIGHT_CONTEXT_MEL_FRAMES = 1


class AudioTooLongError(AudioInputError):
    """More encoder frames than `max_source_positions` position embeddings (30 s for Whisper)."""


class AudioStreamError(AudioInputError):
    """A streaming chunk that cannot continue the given stream state."""


def block_causal_attention_mask(
    frame_lengths: torch.Tensor, num_frames: int, chunk_frames: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """Additive mask [B, 1, T', T']: a query sees real keys up to the end of its own chunk (chunk_frames <= 0: all).

    Returns None when nothing is masked so SDPA can take its unmasked fast path.
    """
    device = frame_lengths.device
    positions = torch.arange(num_frames, device=device)
    allowed = (positions[None, :] < frame_lengths[:, None])[:, None, None, :]  # keys that are real audio
    if chunk_frames > 0:
        visible_end = (positions // chunk_frames + 1) * chunk_frames  # first key a query can no longer see
        allowed = allowed & (positions[None, :] < visible_end[:, None])[None, None]
    if bool(allowed.all()):
        return None
    allowed = allowed.expand(frame_lengths.shape[0], 1, num_frames, num_frames)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def lengths_from_right_padded_mask(mask: torch.Tensor, name: str = "input_features_mask") -> torch.Tensor:
    """[B, T] 1/0 mask -> [B] lengths; raises unless every row is ones followed by zeros."""
    mask = mask.bool()
    lengths = mask.sum(-1)
    prefix = torch.arange(mask.shape[-1], device=mask.device)[None, :] < lengths[:, None]
    if not torch.equal(prefix, mask):
        raise AudioInputError(f"{name} must be right-padded (ones then zeros in every row)")
    return lengths


@dataclass(frozen=True)
class AudioEncoderStreamState:
    """Everything `MiniCPMOAudioEncoder.step` needs from earlier chunks; never mutated (step returns a new one).

    key_values: per layer (key, value), each [1, heads, cached_frames, head_dim]; empty before the first chunk and
        after a reset.
    cached_frames: encoder frames in the cache = position index of the next frame.
    mel_tail: the last 2 raw mel frames [1, num_mel_bins, 2] of the previous chunk (left conv context); kept across
        cache resets because the conv context is audio, not attention state.
    mel_frames_seen: mel frames consumed so far (its parity keeps the stride-2 conv grid aligned).
    """

    key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()
    cached_frames: int = 0
    mel_tail: torch.Tensor | None = None
    mel_frames_seen: int = 0


class MiniCPMOAudioPositionEmbedding(nn.Embedding):
    """`apm.embed_positions`: learned positions that start as Whisper's sinusoids.

    Its own class so a PreTrainedModel's `_init_weights` can dispatch on it: transformers skips `_init_weights` for
    custom-code modules without direct parameters (such as the encoder itself), so the sinusoidal init must hang on
    this module: `if isinstance(module, MiniCPMOAudioPositionEmbedding): module.reset_parameters()`.
    """

    def reset_parameters(self) -> None:
        init.copy_(self.weight, sinusoids(self.num_embeddings, self.embedding_dim).to(self.weight.dtype))


class MiniCPMOAudioEncoderLayer(WhisperEncoderLayer):
    """Whisper pre-LN encoder layer whose attention knows its layer index, so a `cache=` kwarg (a DynamicCache)
    flows through `WhisperEncoderLayer.forward` into `WhisperAttention` and appends this chunk's keys/values."""

    def __init__(self, config: WhisperConfig, layer_idx: int):
        super().__init__(config)
        self.self_attn.layer_idx = layer_idx


class MiniCPMOAudioEncoder(nn.Module):
    """Whisper encoder with block-causal offline attention and a KV-cached streaming `step()` (see module doc).

    Parameter names equal the official `apm.*` keys: conv1, conv2, embed_positions, layers.{i}.*, layer_norm.
    `chunk_length_s` is the top config's `audio_chunk_length` (1 s -> 50 encoder frames per attention chunk).
    """

    def __init__(self, config: WhisperConfig, chunk_length_s: float = 1.0):
        super().__init__()
        self.config = config
        self.chunk_frames = int(round(chunk_length_s * ENCODER_FRAMES_PER_SECOND))
        embed_dim = config.d_model
        self.num_mel_bins = config.num_mel_bins
        self.max_source_positions = config.max_source_positions
        self.dropout = config.dropout
        self.conv1 = nn.Conv1d(config.num_mel_bins, embed_dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(embed_dim, embed_dim, kernel_size=3, stride=2, padding=1)
        self.embed_positions = MiniCPMOAudioPositionEmbedding(config.max_source_positions, embed_dim)
        self.embed_positions.requires_grad_(False)  # frozen, as in transformers' WhisperEncoder
        self.layers = nn.ModuleList(
            [MiniCPMOAudioEncoderLayer(config, layer_idx) for layer_idx in range(config.encoder_layers)]
        )
        self.layer_norm = nn.LayerNorm(embed_dim)

    def reset_positions(self) -> None:
        """Sinusoidal position table, as Whisper initialises it (loaded checkpoints overwrite it)."""
        self.embed_positions.reset_parameters()

    # --- shared pieces ---------------------------------------------------------------------------------------
    def _check_features(self, features: torch.Tensor, name: str) -> None:
        if features.ndim != 3 or features.shape[1] != self.num_mel_bins:
            raise AudioInputError(
                f"{name} must be [batch, {self.num_mel_bins} mel bins, frames], got {tuple(features.shape)}"
            )
        if features.shape[-1] == 0:
            raise AudioInputError(f"{name} has no frames")

    def _convolve(self, mel: torch.Tensor, mel_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """[B, mel_bins, T] -> [B, T', d]; with lengths, whatever lies past the real end reads as zero padding."""
        mel = mel.to(dtype=self.conv1.weight.dtype, device=self.conv1.weight.device)
        real = None
        if mel_lengths is not None:
            real = (torch.arange(mel.shape[-1], device=mel.device)[None, :] < mel_lengths[:, None])[:, None, :]
            mel = mel * real.to(mel.dtype)
        hidden = nn.functional.gelu(self.conv1(mel))
        if real is not None:
            hidden = hidden * real.to(hidden.dtype)
        hidden = nn.functional.gelu(self.conv2(hidden))
        return hidden.transpose(1, 2)

    def _run_layers(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, cache: DynamicCache | None = None
    ) -> torch.Tensor:
        hidden = nn.functional.dropout(hidden, p=self.dropout, training=self.training)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask, cache=cache)
        return self.layer_norm(hidden)

    # --- offline ---------------------------------------------------------------------------------------------
    def forward(
        self,
        input_features: torch.Tensor,
        input_features_mask: torch.Tensor | None = None,
        chunk_frames: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Offline chunked encoding.

        input_features [B, mel_bins, T] log-mel, right-padded; input_features_mask [B, T] (1 = real frame).
        chunk_frames overrides the attention chunk (None: `self.chunk_frames`; <= 0: full attention).
        Returns hidden states after the final layer_norm [B, T', d] and their mask [B, T'] (bool), T' = (T-1)//2+1.
        """
        self._check_features(input_features, "input_features")
        batch, _, mel_frames = input_features.shape
        if input_features_mask is not None:
            if input_features_mask.shape != (batch, mel_frames):
                raise AudioInputError(
                    f"input_features_mask must be [{batch}, {mel_frames}], got {tuple(input_features_mask.shape)}"
                )
            mel_lengths = lengths_from_right_padded_mask(input_features_mask.to(input_features.device))
            if bool((mel_lengths == 0).any()):
                raise AudioInputError("input_features_mask marks an item with no real frames")
        else:
            mel_lengths = torch.full((batch,), mel_frames, dtype=torch.long, device=input_features.device)
        num_frames = encoder_frames_from_mel_frames(mel_frames)
        if num_frames > self.max_source_positions:
            raise AudioTooLongError(
                f"{mel_frames} mel frames give {num_frames} encoder frames, more than max_source_positions="
                f"{self.max_source_positions}; split the audio into pieces of at most 30 s"
            )
        hidden = self._convolve(input_features, mel_lengths if input_features_mask is not None else None)
        hidden = hidden + self.embed_positions.weight[:num_frames]
        frame_lengths = encoder_frames_from_mel_frames(mel_lengths)
        chunk = self.chunk_frames if chunk_frames is None else chunk_frames
        attention_mask = block_causal_attention_mask(frame_lengths, num_frames, chunk, hidden.dtype)
        output_mask = torch.arange(num_frames, device=hidden.device)[None, :] < frame_lengths[:, None]
        return self._run_layers(hidden, attention_mask), output_mask

    # --- streaming -------------------------------------------------------------------------------------------
    def step(
        self,
        input_features_chunk: torch.Tensor,
        state: AudioEncoderStreamState | None = None,
        lookahead_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, AudioEncoderStreamState]:
        """Encode one chunk [1, mel_bins, T] (1 s = 100 frames) -> ([1, (T-1)//2+1, d], new state).

        The chunk attends to the whole cache plus itself with no mask; positions continue at `state.cached_frames`.
        When cache + new frames >= max_source_positions the cache is dropped first and positions restart at 0 (the
        official 30-s reset). `lookahead_features` [1, mel_bins, >=1] are the first mel frames of the NEXT chunk,
        used only as right conv context (the official duplex path sends them as redundancy frames); pass None at the
        end of the audio. With lookahead on every chunk but the last, N steps equal `forward()` on the whole audio.
        Official chunks with redundancy (2 + 100 + 2 mel frames) map to `chunk = x[..., 2:102]`,
        `lookahead_features = x[..., 102:]`; the 2 leading frames are what `state.mel_tail` already holds. The
        official half-duplex prefill convolves each chunk alone: pass `dataclasses.replace(state, mel_tail=None)`
        and no lookahead.
        """
        hidden, key_values, new_state = self._step_inputs(input_features_chunk, state, lookahead_features)
        cache = DynamicCache(ddp_cache_data=key_values) if key_values else DynamicCache()
        hidden = self._run_layers(hidden, None, cache=cache)
        keys_values = tuple((layer.keys, layer.values) for layer in cache.layers)
        return hidden, replace(new_state, key_values=keys_values)

    def step_batch(
        self,
        chunks: list[torch.Tensor],
        states: list[AudioEncoderStreamState],
        lookaheads: list[torch.Tensor | None],
    ) -> tuple[list[torch.Tensor], list[AudioEncoderStreamState]]:
        """`step` for several streams at once: each chunk is convolved against its own context, then all go through
        the layers in one batch over their own KV caches, left-padded to the longest with the padding masked, so
        each stream's output equals its own `step` (up to float summation order). Every chunk must give the same
        number of encoder frames (duplex units do: 50)."""
        if not chunks or not len(chunks) == len(states) == len(lookaheads):
            raise AudioStreamError(f"step_batch needs as many chunks, states and lookaheads, at least one; got "
                                   f"{len(chunks)}, {len(states)}, {len(lookaheads)}")
        prepared = [self._step_inputs(chunk, state, lookahead)
                    for chunk, state, lookahead in zip(chunks, states, lookaheads)]
        frames = {hidden.shape[1] for hidden, _, _ in prepared}
        if len(frames) != 1:
            raise AudioStreamError(f"step_batch chunks must give the same number of encoder frames, got {frames}")
        num_frames = frames.pop()
        hidden = torch.cat([row for row, _, _ in prepared])
        cached = [state.cached_frames - num_frames for _, _, state in prepared]  # cache length before this chunk
        longest = max(cached)
        cache = DynamicCache()
        if longest:
            template = next(key_values for _, key_values, _ in prepared if key_values)[0][0]
            for layer_index in range(len(self.layers)):
                keys, values = [], []
                for (_, key_values, _), length in zip(prepared, cached):
                    pad = (0, 0, longest - length, 0)
                    if key_values:
                        keys.append(nn.functional.pad(key_values[layer_index][0], pad))
                        values.append(nn.functional.pad(key_values[layer_index][1], pad))
                    else:
                        keys.append(template.new_zeros(1, template.shape[1], longest, template.shape[3]))
                        values.append(template.new_zeros(1, template.shape[1], longest, template.shape[3]))
                cache.update(torch.cat(keys), torch.cat(values), layer_index)
        mask = None
        if any(length < longest for length in cached):
            columns = torch.arange(longest + num_frames, device=hidden.device)
            starts = torch.tensor([longest - length for length in cached], device=hidden.device)
            allowed = (columns[None, :] >= starts[:, None])[:, None, None, :]
            mask = torch.zeros((len(chunks), 1, num_frames, longest + num_frames), dtype=hidden.dtype,
                               device=hidden.device).masked_fill(~allowed, torch.finfo(hidden.dtype).min)
        hidden = self._run_layers(hidden, mask, cache=cache)
        outputs, new_states = [], []
        for row, ((_, _, state), length) in enumerate(zip(prepared, cached)):
            start = longest - length
            key_values = tuple((layer.keys[row:row + 1, :, start:].contiguous(),
                                layer.values[row:row + 1, :, start:].contiguous()) for layer in cache.layers)
            outputs.append(hidden[row:row + 1])
            new_states.append(replace(state, key_values=key_values))
        return outputs, new_states

    def _step_inputs(self, input_features_chunk, state, lookahead_features) -> tuple:
        """A chunk's conv output with its positions added [1, n, d], the KV cache it attends to (after the 30-s
        reset), and its new state without the cache (`key_values` filled in by the caller)."""
        state = AudioEncoderStreamState() if state is None else state
        self._check_features(input_features_chunk, "input_features_chunk")
        if input_features_chunk.shape[0] != 1:
            raise AudioStreamError(f"streaming takes one stream at a time, got batch {input_features_chunk.shape[0]}")
        if state.mel_frames_seen % 2:
            raise AudioStreamError(
                "the previous chunk had an odd number of mel frames; only the last chunk of a stream may be odd "
                "(the stride-2 conv grid would shift)"
            )
        mel_frames = input_features_chunk.shape[-1]
        num_frames = encoder_frames_from_mel_frames(mel_frames)
        if num_frames > self.max_source_positions:
            raise AudioTooLongError(
                f"a chunk of {mel_frames} mel frames gives {num_frames} encoder frames, more than "
                f"max_source_positions={self.max_source_positions}"
            )

        left = state.mel_tail
        pieces = [input_features_chunk] if left is None else [left.to(input_features_chunk), input_features_chunk]
        if lookahead_features is not None:
            self._check_features(lookahead_features, "lookahead_features")
            pieces.append(lookahead_features[..., :CONV_RIGHT_CONTEXT_MEL_FRAMES].to(input_features_chunk))
        left_frames = 0 if left is None else left.shape[-1]
        # `left_frames` is even, so conv2 outputs stay on the offline grid; drop the outputs centred on the context.
        hidden = self._convolve(torch.cat(pieces, dim=-1))
        hidden = hidden[:, left_frames // 2 : left_frames // 2 + num_frames]

        key_values, cached = state.key_values, state.cached_frames
        if cached + num_frames >= self.max_source_positions:
            key_values, cached = (), 0
        hidden = hidden + self.embed_positions.weight[cached : cached + num_frames]
        history = torch.cat(pieces[: 2 if left is not None else 1], dim=-1)
        new_state = AudioEncoderStreamState(
            key_values=(),
            cached_frames=cached + num_frames,
            mel_tail=history[..., -CONV_LEFT_CONTEXT_MEL_FRAMES:].detach(),
            mel_frames_seen=state.mel_frames_seen + mel_frames,
        )
        return hidden, key_values, new_state


class MiniCPMOAudioProjector(MultiModalProjector):
    """`audio_projection_layer`: linear1 -> ReLU -> linear2 (both biased), then average pooling over time."""

    def project_and_pool(self, hidden: torch.Tensor, pool_step: int = 5) -> torch.Tensor:
        """[B, T', d] encoder states -> [B, (T' - pool) // pool + 1, out_dim]: project first, then AvgPool1d."""
        if hidden.shape[1] < pool_step:
            raise AudioInputError(f"{hidden.shape[1]} encoder frames are fewer than audio_pool_step={pool_step}")
        projected = self(hidden).transpose(1, 2)
        pooled = nn.functional.avg_pool1d(projected, kernel_size=pool_step, stride=pool_step)
        return pooled.transpose(1, 2)


def audio_embeddings_from_features(
    encoder: MiniCPMOAudioEncoder,
    projector: MiniCPMOAudioProjector,
    input_features: torch.Tensor,
    input_features_mask: torch.Tensor | None = None,
    pool_step: int = 5,
    chunk_frames: int | None = None,
) -> list[torch.Tensor]:
    """Offline path for N right-padded pieces [N, mel_bins, T] -> N tensors [n_i, out_dim] of real tokens only,
    n_i = frames_to_token_count(real mel frames of piece i)."""
    hidden, _ = encoder(input_features, input_features_mask, chunk_frames=chunk_frames)
    return audio_tokens_from_hidden(projector, hidden, input_features, input_features_mask, pool_step)


def audio_tokens_from_hidden(
    projector: MiniCPMOAudioProjector,
    hidden: torch.Tensor,
    input_features: torch.Tensor,
    input_features_mask: torch.Tensor | None = None,
    pool_step: int = 5,
) -> list[torch.Tensor]:
    """Encoder states [N, T', d] of the pieces in `input_features` -> N tensors [n_i, out_dim] of real tokens only."""
    if input_features_mask is None:
        mel_lengths = [input_features.shape[-1]] * input_features.shape[0]
    else:
        mel_lengths = input_features_mask.bool().sum(-1).tolist()
    token_counts = [frames_to_token_count(int(length), pool_step) for length in mel_lengths]
    if min(token_counts) == 0:
        raise AudioInputError(
            f"every audio piece needs at least {2 * pool_step - 1} mel frames for one token, got lengths {mel_lengths}"
        )
    pooled = projector.project_and_pool(hidden, pool_step)
    return [pooled[i, :count] for i, count in enumerate(token_counts)]
