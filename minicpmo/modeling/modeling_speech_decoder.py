"""Speech-token decoder of MiniCPM-o 4.5 (official prefix `tts.`): LLM text + hidden states -> S3 speech codes.

A 20-layer Llama (transformers `LlamaModel`, driven only through `inputs_embeds`) reads one condition vector per
text token, cond_i = emb_text(id_i) + P(h_i) with P an MLP over the LLM's final hidden state, followed by
`audio_bos`, and then predicts codes (6561 S3 codes + EOS) through a weight-normed head. Three ways to drive it:

- `generate_codes`: one turn at once (text, `text_eos`, `audio_bos`, then codes until EOS);
- `step`: half-duplex streaming, one text chunk at a time, keeping the KV cache ("full_attention");
- `generate_unit_codes`: duplex, exactly 25 codes (1 s of audio) per speaking unit, cache kept across a turn.

Training (teacher forcing) runs the same sequences in one causal pass: `speech_loss` for the turn-based layout,
`duplex_speech_loss` for a duplex turn made of units, both on top of `teacher_forced_forward` (padded batches).

Sampling follows the official order: temperature, repetition penalty over a window of recent codes, top-p then
top-k (each keeps at least 3 candidates), EOS masked until a minimum number of codes, multinomial. The first
code of a turn (step 0) sees the temperature and the EOS mask only.
"""

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm
from torch.nn.utils.parametrize import ParametrizationList
from transformers import LlamaConfig, LlamaModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from ..configuration.configuration_minicpmo import MiniCPMTTSConfig
from ..errors import SpeechOutputError
from ..special_tokens import IGNORE_INDEX
from .modeling_projector import MultiModalProjector

# Official constants: top-p/top-k never keep fewer than 3 codes; a streamed text chunk yields at most 500 codes;
# a duplex unit is 1 s = 25 codes at 25 Hz.
MIN_CODES_TO_KEEP = 3
MAX_CODES_PER_STREAM_CHUNK = 500
CODES_PER_DUPLEX_UNIT = 25


class SpeechDecoderInputError(SpeechOutputError):
    """Inputs of the speech-token decoder that do not match its configuration."""


class SpeechSamplingError(SpeechOutputError):
    """Sampling settings that cannot drive code generation."""


SPEECH_IGNORE_INDEX = IGNORE_INDEX


@dataclass
class SpeechSegment:
    """One conditioned piece of a teacher-forced speech sequence: a whole turn, or one duplex unit.

    Laid out as [cond(text_ids, llm_hidden) (+ emb_text(text_eos) if `text_eos`), emb_text(audio_bos), codes...]:
    the audio_bos position predicts codes[0], code i predicts code i+1, and the last code predicts EOS when
    `end_with_eos` (EOS itself is never an input, as in generation). `normalize=None` follows the config.
    Shapes: text_ids [n] (LLM ids), llm_hidden [n, llm_dim], codes [m] (values in [0, num_audio_tokens - 1)).
    """

    text_ids: torch.Tensor
    llm_hidden: torch.Tensor
    codes: torch.Tensor
    text_eos: bool = False
    end_with_eos: bool = True
    normalize: bool | None = None


@dataclass
class SpeechLossOutput:
    """Teacher-forced result: `loss` (mean cross-entropy over the code targets; 0 when there are none),
    `logits` [B, S, num_audio_tokens], `labels` [B, S] (-100 off target), `attention_mask` [B, S]."""

    loss: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def num_targets(self) -> int:
        return int((self.labels != SPEECH_IGNORE_INDEX).sum())


@dataclass
class SpeechSamplingConfig:
    """How the next speech code is picked (official `TTSSamplingParams` plus the generation limits).

    `repetition_window=None` penalises every code seen so far; `top_p >= 1` and `top_k <= 0` switch those
    warpers off (the duplex path uses neither). `do_sample=False` takes the argmax after the penalty.
    """

    temperature: float = 0.8
    top_p: float = 0.85
    top_k: int = 25
    repetition_penalty: float = 1.05
    repetition_window: int | None = 16
    min_new_codes: int = 50
    max_new_codes: int = 2048
    do_sample: bool = True
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature > 0:
            raise SpeechSamplingError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SpeechSamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SpeechSamplingError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise SpeechSamplingError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.repetition_window is not None and self.repetition_window < 1:
            raise SpeechSamplingError(f"repetition_window must be >= 1 or None, got {self.repetition_window}")
        if self.min_new_codes < 0:
            raise SpeechSamplingError(f"min_new_codes must be >= 0, got {self.min_new_codes}")
        if self.max_new_codes < 1:
            raise SpeechSamplingError(f"max_new_codes must be >= 1, got {self.max_new_codes}")

    @classmethod
    def for_duplex(cls, **overrides) -> "SpeechSamplingConfig":
        """Duplex units: temperature and repetition penalty only (the official warpers are built but unused)."""
        return cls(**{"top_p": 1.0, "top_k": 0, **overrides})


@dataclass
class SpeechDecoderStreamState:
    """Everything a streamed turn carries between calls.

    `cache` holds keys/values for positions 0..position-1 (it is updated in place; always continue with the
    state a call returns). `codes` are the codes emitted so far in the turn, `generator` the turn's RNG.
    """

    cache: DynamicCache
    position: int = 0
    codes: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    finished: bool = False

    @property
    def turn_started(self) -> bool:
        return self.position > 0

    def reset(self) -> "SpeechDecoderStreamState":
        """A fresh turn (empty cache, position 0, no codes) that keeps drawing from the same RNG."""
        return SpeechDecoderStreamState(cache=DynamicCache(), generator=self.generator)


def apply_repetition_penalty(
    logits: torch.Tensor, history: torch.Tensor, penalty: float, window: int | None
) -> torch.Tensor:
    """Penalise codes seen in the last `window` codes: factor penalty**count, multiply if negative else divide."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    recent = history[-window:] if window is not None else history
    counts = torch.bincount(recent.to(logits.device), minlength=logits.shape[-1])[: logits.shape[-1]]
    factor = torch.pow(torch.full_like(logits, penalty), counts.to(logits.dtype))
    return torch.where(logits < 0, logits * factor, logits / factor)


def warp_code_logits(
    logits: torch.Tensor,
    history: torch.Tensor,
    sampling: SpeechSamplingConfig,
    eos_code: int,
    mask_eos: bool,
    first_code: bool = False,
) -> torch.Tensor:
    """Temperature -> repetition penalty -> top-p -> top-k -> EOS mask, on logits [V] of one sequence.

    The official decoder draws the first code of a turn (step 0, right after audio_bos) from the temperature-
    scaled distribution with only the EOS mask: `first_code=True` skips the penalty and both warpers.
    """
    scores = logits.float() / sampling.temperature
    if first_code:
        return _mask_eos(scores, eos_code) if mask_eos else scores
    scores = apply_repetition_penalty(scores, history, sampling.repetition_penalty, sampling.repetition_window)
    scores = scores.unsqueeze(0)
    if sampling.top_p < 1.0:
        scores = TopPLogitsWarper(sampling.top_p, min_tokens_to_keep=MIN_CODES_TO_KEEP)(None, scores)
    if sampling.top_k > 0:
        scores = TopKLogitsWarper(sampling.top_k, min_tokens_to_keep=MIN_CODES_TO_KEEP)(None, scores)
    scores = scores.squeeze(0)
    return _mask_eos(scores, eos_code) if mask_eos else scores


def _mask_eos(scores: torch.Tensor, eos_code: int) -> torch.Tensor:
    scores = scores.clone()
    scores[eos_code] = -float("inf")
    return scores


def pick_code(scores: torch.Tensor, sampling: SpeechSamplingConfig, generator: torch.Generator | None) -> int:
    """Multinomial draw from softmax(scores), or the argmax when not sampling."""
    if not sampling.do_sample:
        return int(scores.argmax())
    probs = F.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, num_samples=1, generator=generator))


def init_weight_norm_parametrization(module: nn.Module, std: float = 0.02) -> bool:
    """`_init_weights` hook for weight-normed layers: v ~ N(0, std) and g = ||v|| per output row (weight == v).

    After `weight_norm` the layer itself owns no parameters (transformers' init skips it); g (`original0`) and
    v (`original1`) live on the `ParametrizationList`, so that is the module to catch. Returns whether it was one.
    """
    if not isinstance(module, ParametrizationList):
        return False
    if not (hasattr(module, "original0") and hasattr(module, "original1")):
        return False
    magnitude, direction = module.original0, module.original1
    if magnitude.numel() != direction.shape[0]:
        return False
    init.normal_(direction, mean=0.0, std=std)
    init.copy_(magnitude, direction.detach().flatten(1).norm(dim=1).view_as(magnitude))
    return True


def llama_config_for_speech_decoder(config: MiniCPMTTSConfig) -> LlamaConfig:
    """The backbone config: the TTS sizes, Llama defaults elsewhere (`backbone_vocab_size`, 32000 as in the
    official weights, sizes the unused embed_tokens)."""
    attn_implementation = getattr(config, "_attn_implementation", None)
    return LlamaConfig(
        vocab_size=config.backbone_vocab_size,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        num_hidden_layers=config.num_hidden_layers,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        hidden_act=config.hidden_act,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **({"attn_implementation": attn_implementation} if attn_implementation else {}),
    )


class MiniCPMOSpeechDecoder(nn.Module):
    """LLM text/hidden states -> speech codes. Parameter names equal the official `tts.*` keys."""

    def __init__(self, config: MiniCPMTTSConfig):
        super().__init__()
        for name in ("audio_bos_token_id", "text_eos_token_id"):
            if not 0 <= getattr(config, name) < config.num_text_tokens:
                raise SpeechDecoderInputError(
                    f"tts_config.{name} ({getattr(config, name)}) must index emb_text "
                    f"(num_text_tokens={config.num_text_tokens})"
                )
        self.config = config
        self.emb_text = nn.Embedding(config.num_text_tokens, config.hidden_size)
        self.model = LlamaModel(llama_config_for_speech_decoder(config))
        self.projector_spk = MultiModalProjector(config.llm_dim, config.hidden_size)
        self.projector_semantic = MultiModalProjector(config.llm_dim, config.hidden_size)
        self.emb_code = nn.ModuleList(
            [nn.Embedding(config.num_audio_tokens, config.hidden_size) for _ in range(config.num_vq)]
        )
        self.head_code = nn.ModuleList(
            [
                weight_norm(nn.Linear(config.hidden_size, config.num_audio_tokens, bias=False), name="weight", dim=0)
                for _ in range(config.num_vq)
            ]
        )

    # --- properties ------------------------------------------------------------------------------------------
    @property
    def eos_code(self) -> int:
        """The last audio id ends the speech (6561 in the released model)."""
        return self.config.num_audio_tokens - 1

    @property
    def device(self) -> torch.device:
        return self.emb_text.weight.device

    def reset_code_heads(self, std: float = 0.02) -> None:
        """Re-initialise the weight-normed heads (v ~ N(0, std), g = ||v||), e.g. after meta-device construction.

        Inside a `PreTrainedModel`, call `init_weight_norm_parametrization(module, std)` from `_init_weights`
        instead: transformers never hands this module (which owns no direct parameters) to `_init_weights`.
        """
        for head in self.head_code:
            init_weight_norm_parametrization(head.parametrizations.weight, std)

    # --- condition -------------------------------------------------------------------------------------------
    def condition(
        self, text_ids: torch.Tensor, llm_hidden: torch.Tensor, normalize: bool | None = None
    ) -> torch.Tensor:
        """[B, n] text ids + [B, n, llm_dim] LLM hidden states -> [B, n, hidden] condition embeddings.

        `normalize` defaults to `config.normalize_projected_hidden` (L2-normalise the projected hidden state).
        """
        self._check_condition_inputs(text_ids, llm_hidden)
        weight = self.projector_semantic.linear1.weight
        projected = self.projector_semantic(llm_hidden.to(device=weight.device, dtype=weight.dtype))
        if self.config.normalize_projected_hidden if normalize is None else normalize:
            projected = F.normalize(projected, p=2, dim=-1)
        return self.emb_text(text_ids.to(self.device)) + projected

    def _check_condition_inputs(self, text_ids: torch.Tensor, llm_hidden: torch.Tensor) -> None:
        if not isinstance(text_ids, torch.Tensor) or text_ids.dtype not in (torch.int32, torch.int64):
            raise SpeechDecoderInputError("text_ids must be an integer tensor of LLM token ids")
        if not isinstance(llm_hidden, torch.Tensor) or not llm_hidden.is_floating_point():
            raise SpeechDecoderInputError("llm_hidden must be a floating-point tensor")
        if text_ids.dim() != 2 or llm_hidden.dim() != 3:
            raise SpeechDecoderInputError(
                f"expected text_ids [B, n] and llm_hidden [B, n, llm_dim], got {tuple(text_ids.shape)} and "
                f"{tuple(llm_hidden.shape)}"
            )
        if tuple(llm_hidden.shape[:2]) != tuple(text_ids.shape):
            raise SpeechDecoderInputError(
                f"text_ids {tuple(text_ids.shape)} and llm_hidden {tuple(llm_hidden.shape[:2])} disagree on [B, n]"
            )
        if llm_hidden.shape[-1] != self.config.llm_dim:
            raise SpeechDecoderInputError(
                f"llm_hidden width {llm_hidden.shape[-1]} != tts_config.llm_dim {self.config.llm_dim}"
            )
        if text_ids.numel() and (int(text_ids.min()) < 0 or int(text_ids.max()) >= self.config.num_text_tokens):
            raise SpeechDecoderInputError(
                f"text id out of range [0, {self.config.num_text_tokens}): min {int(text_ids.min())}, "
                f"max {int(text_ids.max())}"
            )

    def _single_sequence(self, text_ids: torch.Tensor, llm_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Accept [n] / [n, llm_dim] or a batch of one; generation decodes one sequence at a time."""
        if text_ids.dim() == 1:
            text_ids = text_ids.unsqueeze(0)
        if llm_hidden.dim() == 2:
            llm_hidden = llm_hidden.unsqueeze(0)
        if text_ids.dim() == 2 and text_ids.shape[0] != 1:
            raise SpeechDecoderInputError(f"speech generation takes one sequence, got a batch of {text_ids.shape[0]}")
        return text_ids, llm_hidden

    def _text_token_embedding(self, token_id: int) -> torch.Tensor:
        return self.emb_text(torch.tensor([[token_id]], device=self.device))

    # --- decoding primitives ---------------------------------------------------------------------------------
    def new_stream_state(self, seed: int | None = None) -> SpeechDecoderStreamState:
        """An empty turn: no cache entries, position 0, an RNG seeded with `seed` (global RNG when None)."""
        if self.config.num_vq != 1:
            raise SpeechDecoderInputError(f"generation supports num_vq == 1, got {self.config.num_vq}")
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        return SpeechDecoderStreamState(cache=DynamicCache(config=self.model.config), generator=generator)

    def _feed(self, embeds: torch.Tensor, state: SpeechDecoderStreamState) -> torch.Tensor:
        """Run embeds [1, m, hidden] at the next m positions on the cache; return the last position's code logits."""
        length = embeds.shape[1]
        positions = torch.arange(state.position, state.position + length, device=embeds.device).unsqueeze(0)
        output = self.model(inputs_embeds=embeds, position_ids=positions, cache=state.cache, use_cache=True)
        state.position += length
        return self.head_code[0](output.last_hidden_state[:, -1])[0]

    def _decode_codes(
        self,
        prefix: torch.Tensor,
        state: SpeechDecoderStreamState,
        sampling: SpeechSamplingConfig,
        history: list[int],
        min_codes: int,
        max_samples: int,
        feed_last: bool,
    ) -> tuple[list[int], bool]:
        """Feed `prefix`, then sample codes (each fed back) until EOS or `max_samples` samples.

        EOS is masked while len(history) + len(new) < min_codes; the penalty sees `history` + new codes.
        With feed_last=False the last sample of a full run is not fed, so the caller may discard it.
        Returns (new codes, whether EOS ended the run).
        """
        logits = self._feed(prefix, state)
        new: list[int] = []
        while True:
            seen = history + new
            seen_tensor = torch.tensor(seen, dtype=torch.long, device=logits.device)
            scores = warp_code_logits(
                logits, seen_tensor, sampling, self.eos_code, mask_eos=len(seen) < min_codes, first_code=not seen
            )
            code = pick_code(scores, sampling, state.generator)
            if code == self.eos_code:
                return new, True
            new.append(code)
            if len(new) >= max_samples and not feed_last:
                return new, False
            logits = self._feed(self.emb_code[0](torch.tensor([[code]], device=self.device)), state)
            if len(new) >= max_samples:
                return new, False

    # --- turn-based ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_codes(
        self, text_ids: torch.Tensor, llm_hidden: torch.Tensor, sampling: SpeechSamplingConfig | None = None
    ) -> torch.LongTensor:
        """Whole turn: [cond_1..cond_n, text_eos, audio_bos] then codes until EOS (dropped) -> LongTensor [n_codes]."""
        sampling = sampling or SpeechSamplingConfig()
        state = self.new_stream_state(sampling.seed)
        codes, _ = self.step(
            text_ids, llm_hidden, state, is_last_chunk=True, sampling=sampling,
            max_codes_per_chunk=sampling.max_new_codes,
        )
        return codes

    # --- half-duplex streaming -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(
        self,
        text_ids_chunk: torch.Tensor,
        llm_hidden_chunk: torch.Tensor,
        state: SpeechDecoderStreamState,
        is_last_chunk: bool,
        sampling: SpeechSamplingConfig | None = None,
        max_codes_per_chunk: int = MAX_CODES_PER_STREAM_CHUNK,
    ) -> tuple[torch.LongTensor, SpeechDecoderStreamState]:
        """One text chunk -> its codes. Feeds [cond x k] (+ text_eos when last) + audio_bos after the cached turn.

        Positions continue across chunks and the KV cache is kept whole ("full_attention"); EOS is never fed.
        EOS stays masked until the turn has `sampling.min_new_codes` codes; the turn stops at `max_new_codes`.
        Returns (codes [n] on the decoder's device, the state for the next chunk).
        """
        sampling = sampling or SpeechSamplingConfig()
        if state.finished:
            raise SpeechDecoderInputError("this stream state already finished its turn; start a new_stream_state()")
        if max_codes_per_chunk < 1:
            raise SpeechDecoderInputError(f"max_codes_per_chunk must be >= 1, got {max_codes_per_chunk}")
        text_ids_chunk, llm_hidden_chunk = self._single_sequence(text_ids_chunk, llm_hidden_chunk)
        budget = min(max_codes_per_chunk, sampling.max_new_codes - len(state.codes))
        if budget <= 0:
            return torch.zeros(0, dtype=torch.long, device=self.device), replace(state, finished=is_last_chunk)
        parts = [self.condition(text_ids_chunk, llm_hidden_chunk)]
        if is_last_chunk:
            parts.append(self._text_token_embedding(self.config.text_eos_token_id))
        parts.append(self._text_token_embedding(self.config.audio_bos_token_id))
        prefix = torch.cat(parts, dim=1)
        new, _ = self._decode_codes(
            prefix, state, sampling, history=list(state.codes), min_codes=sampling.min_new_codes,
            max_samples=budget, feed_last=True,
        )
        next_state = replace(state, codes=state.codes + new, finished=is_last_chunk)
        return torch.tensor(new, dtype=torch.long, device=self.device), next_state

    # --- duplex ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_unit_codes(
        self,
        text_ids: torch.Tensor,
        llm_hidden: torch.Tensor,
        state: SpeechDecoderStreamState,
        turn_start: bool,
        unit_has_turn_eos: bool,
        codes_per_unit: int = CODES_PER_DUPLEX_UNIT,
        sampling: SpeechSamplingConfig | None = None,
    ) -> tuple[torch.LongTensor, SpeechDecoderStreamState]:
        """One speaking unit -> exactly `codes_per_unit` codes (fewer only at turn start or on a turn_eos unit).

        `text_ids`/`llm_hidden` are the unit's tokens without the leading <|speak|> and the terminator (may be
        empty). The condition is always L2-normalised and ends with audio_bos (no text_eos). codes_per_unit + 1
        codes are drawn and the last discarded; EOS is masked except at turn start / turn end. The penalty sees
        this call's codes only and no top-p/top-k applies (`SpeechSamplingConfig.for_duplex()`). After a turn_eos
        unit the returned state is a fresh one (cache and positions reset, RNG kept).
        """
        sampling = sampling or SpeechSamplingConfig.for_duplex()
        if codes_per_unit < 1:
            raise SpeechDecoderInputError(f"codes_per_unit must be >= 1, got {codes_per_unit}")
        text_ids, llm_hidden = self._single_sequence(text_ids, llm_hidden)
        condition = self.condition(text_ids, llm_hidden, normalize=True)
        prefix = torch.cat([condition, self._text_token_embedding(self.config.audio_bos_token_id)], dim=1)
        may_stop = turn_start or unit_has_turn_eos
        new, _ = self._decode_codes(
            prefix, state, sampling, history=[], min_codes=0 if may_stop else codes_per_unit + 1,
            max_samples=codes_per_unit + 1, feed_last=False,
        )
        codes = new[:codes_per_unit]
        if unit_has_turn_eos:
            next_state = state.reset()
        else:
            next_state = replace(state, codes=state.codes + codes)
        return torch.tensor(codes, dtype=torch.long, device=self.device), next_state

    # --- training (teacher forcing) ----------------------------------------------------------------------------
    def _segment_embeds(self, segment: SpeechSegment) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds [S, hidden], labels [S]) of one segment, laid out as `SpeechSegment` describes."""
        text_ids = torch.as_tensor(segment.text_ids, device=self.device).long()
        codes = torch.as_tensor(segment.codes, device=self.device).long()
        if text_ids.dim() != 1 or codes.dim() != 1:
            raise SpeechDecoderInputError(
                f"a speech segment takes text_ids [n] and codes [m], got {tuple(text_ids.shape)} and {tuple(codes.shape)}"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.eos_code):
            raise SpeechDecoderInputError(
                f"speech codes must lie in [0, {self.eos_code}) (EOS is added by the loss), got values in "
                f"[{int(codes.min())}, {int(codes.max())}]"
            )
        parts = [self.condition(text_ids[None], segment.llm_hidden[None], segment.normalize)[0]]
        if segment.text_eos:
            parts.append(self._text_token_embedding(self.config.text_eos_token_id)[0])
        parts.append(self._text_token_embedding(self.config.audio_bos_token_id)[0])
        parts.append(self.emb_code[0](codes))
        embeds = torch.cat(parts, dim=0)
        prefix = embeds.shape[0] - codes.numel() - 1  # positions before audio_bos
        labels = torch.full((embeds.shape[0],), SPEECH_IGNORE_INDEX, dtype=torch.long, device=self.device)
        labels[prefix : prefix + codes.numel()] = codes
        if segment.end_with_eos:
            labels[-1] = self.eos_code
        return embeds, labels

    def teacher_forced_forward(self, sequences: list[list[SpeechSegment]]) -> SpeechLossOutput:
        """Batched teacher forcing: each sequence is its segments concatenated into one causal sequence from
        position 0 (the KV of earlier segments is visible to later ones, as in cached generation); sequences are
        right padded. Returns the code logits at every position and the cross-entropy over the code targets."""
        if self.config.num_vq != 1:
            raise SpeechDecoderInputError(f"speech training supports num_vq == 1, got {self.config.num_vq}")
        if not sequences or any(not segments for segments in sequences):
            raise SpeechDecoderInputError("teacher_forced_forward needs at least one sequence, each with a segment")
        built = []
        for segments in sequences:
            pieces = [self._segment_embeds(segment) for segment in segments]
            built.append((torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])))
        longest = max(embeds.shape[0] for embeds, _ in built)
        hidden_size = built[0][0].shape[-1]
        embeds = built[0][0].new_zeros(len(built), longest, hidden_size)
        labels = torch.full((len(built), longest), SPEECH_IGNORE_INDEX, dtype=torch.long, device=self.device)
        attention_mask = torch.zeros(len(built), longest, dtype=torch.long, device=self.device)
        for row, (sequence_embeds, sequence_labels) in enumerate(built):
            embeds[row, : sequence_embeds.shape[0]] = sequence_embeds
            labels[row, : sequence_labels.shape[0]] = sequence_labels
            attention_mask[row, : sequence_embeds.shape[0]] = 1
        positions = torch.arange(longest, device=self.device).unsqueeze(0).expand(len(built), -1)
        output = self.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions, use_cache=False)
        logits = self.head_code[0](output.last_hidden_state)
        mask = labels != SPEECH_IGNORE_INDEX
        if mask.any():
            loss = F.cross_entropy(logits[mask].float(), labels[mask])
        else:  # keeps the graph connected so a batch without targets backpropagates a zero
            loss = logits.sum() * 0.0
        return SpeechLossOutput(loss=loss, logits=logits, labels=labels, attention_mask=attention_mask)

    def speech_loss(
        self,
        text_ids: torch.Tensor,
        llm_hidden: torch.Tensor,
        codes: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        normalize: bool | None = None,
    ) -> SpeechLossOutput:
        """Turn-based teacher forcing: per row [cond_1..cond_n, text_eos, audio_bos, codes] with EOS at the end.

        text_ids [B, n] + llm_hidden [B, n, llm_dim] (the spoken tokens and their final-norm LLM hidden states),
        text_mask [B, n] (1 on real tokens; right padding), codes [B, m] right padded with -100. The logits equal
        those of `generate_codes` fed the same codes (tested).
        """
        self._check_condition_inputs(text_ids, llm_hidden)
        if codes.dim() != 2 or codes.shape[0] != text_ids.shape[0]:
            raise SpeechDecoderInputError(
                f"codes must be [B, m] with B = {text_ids.shape[0]}, got {tuple(codes.shape)}"
            )
        if text_mask is None:
            text_mask = torch.ones_like(text_ids, dtype=torch.bool)
        text_mask = text_mask.bool()
        sequences = []
        for row in range(text_ids.shape[0]):
            keep = text_mask[row].to(text_ids.device)
            row_codes = codes[row][codes[row] != SPEECH_IGNORE_INDEX]
            sequences.append([SpeechSegment(
                text_ids[row][keep], llm_hidden[row][keep.to(llm_hidden.device)], row_codes,
                text_eos=True, end_with_eos=True, normalize=normalize,
            )])
        return self.teacher_forced_forward(sequences)

    def duplex_speech_loss(self, turns: list[list[SpeechSegment]]) -> SpeechLossOutput:
        """Duplex teacher forcing: each turn is one causal sequence [unit1 cond, audio_bos, codes_1, unit2 cond, ...].

        Units come as `SpeechSegment`s (text_ids/llm_hidden of the unit's tokens after `<|speak|>`, terminator
        excluded; codes normally 25); the condition is always L2-normalised and has no text_eos, as in
        `generate_unit_codes`. Set `end_with_eos` only where generation may stop early (turn start, turn end).
        """
        duplex_turns = [
            [replace(unit, text_eos=False, normalize=True) for unit in units] for units in turns
        ]
        return self.teacher_forced_forward(duplex_turns)


__all__ = [
    "SPEECH_IGNORE_INDEX",
    "MiniCPMOSpeechDecoder",
    "SpeechDecoderInputError",
    "SpeechDecoderStreamState",
    "SpeechLossOutput",
    "SpeechSamplingConfig",
    "SpeechSegment",
    "SpeechSamplingError",
    "apply_repetition_penalty",
    "init_weight_norm_parametrization",
    "pick_code",
    "warp_code_logits",
]
