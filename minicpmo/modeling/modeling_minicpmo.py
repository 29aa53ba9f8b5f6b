"""MiniCPM-o 4.5 for transformers 5: Qwen3 LLM + NaViT SigLIP/resampler vision + streaming Whisper audio.

Layout (the one TRL and PEFT expect): `MiniCPMOForConditionalGeneration.model` is `MiniCPMOModel`, which merges
image and audio features into the text embeddings and returns `last_hidden_state`; `lm_head` sits beside it.
Official checkpoints name the same tensors `llm.model.*`, `llm.lm_head.*`, `vpm.*`, `resampler.*`, `apm.*`,
`audio_projection_layer.*`; a registered weight renaming (reversed on save) maps between the two.
"""

import json
import os
from pathlib import Path

import safetensors.torch
import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, Qwen3Model
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from ..configuration.configuration_minicpmo import MiniCPMOConfig
from ..configuration.configuration_token2wav import Token2WavConfig
from ..errors import CheckpointError, ContextLengthError, SpeechOutputError
from .attention_gqa import SDPA_GQA
from .modeling_audio import (
    MiniCPMOAudioEncoder,
    MiniCPMOAudioPositionEmbedding,
    MiniCPMOAudioProjector,
    audio_tokens_from_hidden,
)
from .modeling_duplex import MiniCPMODuplexMixin
from .modeling_layer_outputs import recorded_layer_states
from .modeling_multimodal_merge import scatter_into_slots, span_slot_mask
from .modeling_resampler import MiniCPMOResampler, get_2d_sincos_pos_embed
from .modeling_speech_decoder import MiniCPMOSpeechDecoder
from .modeling_speech_output import MiniCPMOSpeechOutputMixin
from .modeling_token2wav import MiniCPMOToken2Wav, init_token2wav_weights
from .modeling_vision import MiniCPMOVisionTransformer


# Official key prefix -> our module path. Reversed on save, so checkpoints keep the official names.
OFFICIAL_KEY_RENAMES = {
    r"^llm\.model\.": "model.language_model.",
    r"^llm\.lm_head\.": "lm_head.",
    r"^vpm\.": "model.vpm.",
    r"^resampler\.": "model.resampler.",
    r"^apm\.": "model.apm.",
    r"^audio_projection_layer\.": "model.audio_projection_layer.",
}


def official_weight_renamings() -> list[WeightRenaming]:
    return [WeightRenaming(source, target) for source, target in OFFICIAL_KEY_RENAMES.items()]


register_checkpoint_conversion_mapping("minicpmo", official_weight_renamings(), overwrite=True)

# The official checkpoint also stores these float32 buffers (our names; the resampler table is 70 x 70). Our modules
# rebuild them, so loading ignores them, and saving writes them so that the key set stays the official one.
OFFICIAL_BUFFERS = (
    "model.language_model.rotary_emb.inv_freq",
    "tts.model.rotary_emb.inv_freq",
    "model.resampler.pos_embed",
)
OFFICIAL_POS_EMBED_SIZE = (70, 70)


def _initial_inv_freq(rotary: nn.Module) -> torch.Tensor:
    """A rotary embedding's float32 inverse frequencies as built (not as cast by a later `model.to(dtype)`)."""
    if rotary.rope_type == "default":
        inv_freq, _ = rotary.compute_default_rope_parameters(rotary.config)
    else:
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rotary.rope_type](rotary.config, "cpu")
    return inv_freq.detach().to("cpu", torch.float32)


class MiniCPMOPreTrainedModel(PreTrainedModel):
    config_class = MiniCPMOConfig
    config: MiniCPMOConfig
    base_model_prefix = "model"
    input_modalities = ("text", "image", "audio")
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen3DecoderLayer", "SiglipEncoderLayer", "MiniCPMOAudioEncoderLayer", "LlamaDecoderLayer"]
    _skip_keys_device_placement = "cache"
    # The official resampler table (rebuilt here); rotary inv_freq buffers are ignored by transformers itself.
    _keys_to_ignore_on_load_unexpected = [r"(^|\.)resampler\.pos_embed$"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if init_token2wav_weights(module, std):  # also every weight-norm pair (speech decoder head included)
            return
        if isinstance(module, MiniCPMOResampler):
            module.reset_parameters_and_buffers(std=std)
        elif isinstance(module, MiniCPMOAudioPositionEmbedding):
            module.reset_parameters()

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        """No request means "sdpa_gqa" (sdpa without the per-unit KV copy, see attention_gqa.py) where sdpa works."""
        chosen = super().get_correct_attn_implementation(requested_attention, is_init_check=is_init_check)
        return SDPA_GQA if requested_attention is None and chosen == "sdpa" else chosen

    def _share_attn_implementation(self) -> None:
        """Towers built from sub-configs follow the model's attention implementation unless set explicitly."""
        chosen = self.config._attn_implementation or "sdpa"
        for sub in (self.config.vision_config, self.config.audio_config, self.config.tts_config):
            if sub is not None and sub._attn_implementation is None:
                sub._attn_implementation = chosen

    def _keep_existing_no_split_modules(self) -> None:
        """FSDP auto-wrap and device_map require every listed class to exist in the built model."""
        present = {type(m).__name__ for m in self.modules()}
        self._no_split_modules = {name for name in (self._no_split_modules or ()) if name in present}


class MiniCPMOModel(MiniCPMOPreTrainedModel):
    """Encoders + LLM backbone; returns the LLM's last hidden state for any mix of text, images and audio."""

    def __init__(self, config: MiniCPMOConfig):
        super().__init__(config)
        self._share_attn_implementation()
        self.language_model = Qwen3Model(config)
        if config.init_vision:
            self.vpm = MiniCPMOVisionTransformer(config.vision_config)
            self.resampler = MiniCPMOResampler(
                num_queries=config.query_num,
                embed_dim=config.hidden_size,
                num_heads=config.resampler_num_heads,
                kv_dim=config.vision_config.hidden_size,
            )
        if config.init_audio:
            self.apm = MiniCPMOAudioEncoder(config.audio_config, chunk_length_s=config.audio_chunk_length)
            self.audio_projection_layer = MiniCPMOAudioProjector(config.audio_projector_input_size, config.hidden_size)
        self.post_init()
        self._keep_existing_no_split_modules()

    def init_parallel_plans(self) -> None:
        """The config's plans are the LLM's (`layers.*`, as Qwen3 names them); `language_model` contributes them
        under its real prefix, so the unprefixed copies, which match no parameter here, are dropped."""
        super().init_parallel_plans()
        children = {name for name, _ in self.named_children()}
        for attribute in ("_tp_plan", "_pp_plan", "_ep_plan", "_fsdp_plan"):
            plan = getattr(self, attribute) or {}
            setattr(self, attribute, {key: rule for key, rule in plan.items() if key.split(".")[0] in children})

    def get_input_embeddings(self):
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value):
        self.language_model.embed_tokens = value

    # --- encoders -------------------------------------------------------------------------------------------
    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, tgt_sizes: torch.LongTensor, output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """[N slices, 3, p, L*p] strips -> `pooler_output` [N, query_num, hidden] (the resampled features the LLM
        reads), `last_hidden_state` [N, L, vision_dim] (the vision tower; padded patches zero) and, with
        `output_hidden_states`, the tower's embeddings and per-layer states (5.24's multimodal convention)."""
        if not self.config.init_vision:
            raise ValueError("this model was built with init_vision=False and cannot take images")
        record = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        pixel_values = pixel_values.to(self.vpm.embeddings.patch_embedding.weight.dtype)
        # Recording runs the slices as one chunk (the result does not depend on the chunking).
        batch_size = None if record else self.config.vision_batch_size
        with recorded_layer_states(self.vpm.encoder.layers, record) as states:
            vision = self.vpm(pixel_values, tgt_sizes, vision_batch_size=batch_size)
        return BaseModelOutputWithPooling(
            last_hidden_state=vision.last_hidden_state,
            pooler_output=self.resampler(vision.last_hidden_state, tgt_sizes, vision.patch_mask),
            hidden_states=tuple(states) if record else None,
        )

    @can_return_tuple
    def get_audio_features(
        self, input_features: torch.Tensor, input_features_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None, **kwargs,
    ) -> BaseModelOutputWithPooling:
        """[N pieces, 80, T] log-mel -> `pooler_output` [n_tokens, hidden] (all real audio tokens, concatenated in
        reading order: what the LLM reads), `last_hidden_state` [N, T', d] (the audio tower) and, with
        `output_hidden_states`, the tower's embeddings and per-layer states."""
        if not self.config.init_audio:
            raise ValueError("this model was built with init_audio=False and cannot take audio")
        record = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        input_features = input_features.to(self.apm.conv1.weight.dtype)
        with recorded_layer_states(self.apm.layers, record) as states:
            hidden, _ = self.apm(input_features, input_features_mask)
        pieces = audio_tokens_from_hidden(
            self.audio_projection_layer, hidden, input_features, input_features_mask, self.config.audio_pool_step
        )
        return BaseModelOutputWithPooling(
            last_hidden_state=hidden, pooler_output=torch.cat(pieces, dim=0),
            hidden_states=tuple(states) if record else None,
        )

    def image_slot_mask(self, input_ids: torch.LongTensor) -> torch.BoolTensor:
        c = self.config
        return span_slot_mask(
            input_ids, (c.image_start_token_id, c.slice_start_token_id), (c.image_end_token_id, c.slice_end_token_id),
            c.unk_token_id,
        )

    def audio_slot_mask(self, input_ids: torch.LongTensor) -> torch.BoolTensor:
        """Slots inside <|audio_start|> spans, plus the bare audio slots of duplex units (in a unit, not an image)."""
        c = self.config
        in_audio_span = span_slot_mask(input_ids, (c.audio_start_token_id,), (c.audio_end_token_id,), c.unk_token_id)
        in_unit = span_slot_mask(input_ids, (c.unit_start_token_id,), (c.unit_end_token_id,), c.unk_token_id)
        return in_audio_span | (in_unit & ~self.image_slot_mask(input_ids))

    def embed_multimodal(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        tgt_sizes: torch.LongTensor | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text embeddings with image and audio features poured into their placeholder slots."""
        return self._embed_with_features(input_ids, pixel_values, tgt_sizes, input_features, input_features_mask)[0]

    def _embed_with_features(self, input_ids, pixel_values, tgt_sizes, input_features, input_features_mask):
        """(embeddings, image encoder output or None, audio encoder output or None); see get_*_features."""
        inputs_embeds = self.get_input_embeddings()(input_ids)
        image_outputs = audio_outputs = None
        if pixel_values is not None:
            if tgt_sizes is None:
                raise ValueError("pixel_values were given without tgt_sizes (patch grid of every slice)")
            image_outputs = self.get_image_features(pixel_values, tgt_sizes, output_hidden_states=False)
            inputs_embeds = scatter_into_slots(
                inputs_embeds, self.image_slot_mask(input_ids), image_outputs.pooler_output.flatten(0, 1), "image"
            )
        elif self.config.init_vision and self.training:
            # Keep the vision tower in the graph so DDP / ZeRO see a gradient for it on text-only batches.
            inputs_embeds = inputs_embeds + 0.0 * sum(p.sum() for p in self.resampler.parameters())
        if input_features is not None:
            audio_outputs = self.get_audio_features(input_features, input_features_mask, output_hidden_states=False)
            inputs_embeds = scatter_into_slots(
                inputs_embeds, self.audio_slot_mask(input_ids), audio_outputs.pooler_output, "audio"
            )
        elif self.config.init_audio and self.training:
            inputs_embeds = inputs_embeds + 0.0 * sum(p.sum() for p in self.audio_projection_layer.parameters())
        return inputs_embeds, image_outputs, audio_outputs

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # the 5.24 models' way: both names work
    @can_return_tuple  # return_dict=False gives the output's tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        tgt_sizes: torch.LongTensor | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> MultimodalBaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        image_outputs = audio_outputs = None
        if inputs_embeds is None:
            inputs_embeds, image_outputs, audio_outputs = self._embed_with_features(
                input_ids, pixel_values, tgt_sizes, input_features, input_features_mask
            )
        self._check_context_length(inputs_embeds.shape[1], cache)
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        return MultimodalBaseModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=image_outputs,
            audio_outputs=audio_outputs,
        )

    def _check_context_length(self, new_tokens: int, cache) -> None:
        past = cache.get_seq_length() if cache is not None else 0
        if past + new_tokens > self.config.max_position_embeddings:
            raise ContextLengthError(
                f"prompt of {new_tokens} tokens plus {past} cached tokens exceeds the context of "
                f"{self.config.max_position_embeddings} positions (max_position_embeddings)"
            )


class MiniCPMOForConditionalGeneration(
    MiniCPMODuplexMixin, MiniCPMOSpeechOutputMixin, MiniCPMOPreTrainedModel, GenerationMixin
):
    """MiniCPM-o 4.5: `generate()` over text, images and audio; speech output through `tts` and `token2wav`.

    `tts` (the speech-token decoder) is part of the official checkpoint. `token2wav` is not: the official release
    ships it as separate files, so its weights are kept out of model.safetensors and stored in the `token2wav/`
    subfolder (see `save_pretrained` / `from_pretrained` / `load_token2wav`).
    """

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _keys_to_ignore_on_load_missing = [r"^token2wav\."]
    # token2wav (flow matching + vocoder) stays float32 whatever `dtype=` asks for ("strict": bf16 too, as the
    # official code keeps it); set per instance in __init__ so that only a model that has it names it.
    _keep_in_fp32_modules_strict = None
    _tp_plan = {"lm_head": "colwise_gather_output"}  # vocabulary-sharded, like the embeddings (Qwen3ForCausalLM)
    token2wav_subfolder = "token2wav"
    token2wav_weights_loaded = False

    def __init__(self, config: MiniCPMOConfig):
        super().__init__(config)
        self._share_attn_implementation()
        self.model = MiniCPMOModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.init_tts:
            self.tts = MiniCPMOSpeechDecoder(config.tts_config)
            if config.token2wav_config is not None:  # the config asks for one (trained or converted into it)
                self._attach_token2wav(config.token2wav_config)
        self.post_init()
        self._keep_existing_no_split_modules()

    def _attach_token2wav(self, token2wav_config) -> None:
        """Build token2wav (float32) and keep its weights out of model.safetensors.

        Only built when a config names it or its weights are loaded (`load_token2wav`): the official config has no
        token2wav_config, and a random full-size one (307 M parameters, ~1 GB) would only speak noise."""
        if not isinstance(token2wav_config, Token2WavConfig):
            # Remote code loads the configuration and modeling files as separate module copies, so the config
            # object can be an instance of the other copy's class (or a plain dict from a token2wav/ folder).
            values = token2wav_config if isinstance(token2wav_config, dict) else token2wav_config.to_dict()
            token2wav_config = Token2WavConfig.from_dict(values)
        self.token2wav = MiniCPMOToken2Wav(token2wav_config)
        self._keep_in_fp32_modules_strict = ["token2wav"]
        self._keys_to_ignore_on_save = {f"token2wav.{k}" for k in self.token2wav.state_dict()}

    # --- saving: the official layout; token2wav weights live next to the checkpoint, not inside it ----------------
    def official_buffers(self) -> dict[str, torch.Tensor]:
        """The OFFICIAL_BUFFERS this model has, under our names, as the official checkpoint stores them (float32)."""
        buffers = {}
        modules = dict(self.named_modules())
        for name in OFFICIAL_BUFFERS:
            module_name = name.rpartition(".")[0]
            if module_name not in modules:
                continue  # a part built with init_vision / init_tts False
            if name.endswith("pos_embed"):
                buffers[name] = get_2d_sincos_pos_embed(modules[module_name].embed_dim, *OFFICIAL_POS_EMBED_SIZE)
            else:
                buffers[name] = _initial_inv_freq(modules[module_name])
        return buffers

    def checkpoint_state_dict(self, state_dict: dict | None = None) -> dict:
        """What save_pretrained hands to transformers: the state dict (ours unless given) plus `official_buffers()`.

        transformers then drops token2wav (`_keys_to_ignore_on_save`) and tied copies, and renames to the official keys.
        """
        state = dict(self.state_dict() if state_dict is None else state_dict)
        for name, tensor in self.official_buffers().items():
            state.setdefault(name, tensor)
        return state

    def save_pretrained(self, save_directory, is_main_process: bool = True, state_dict: dict | None = None, **kwargs):
        """Writes the official layout: official key names and buffers, and config.json with `architectures`
        ["MiniCPMO"] (see `MiniCPMOConfig.to_dict`); token2wav goes to the `token2wav/` subfolder."""
        if not getattr(self, "_hf_peft_config_loaded", False) and getattr(self, "hf_quantizer", None) is None:
            state_dict = self.checkpoint_state_dict(state_dict)
        super().save_pretrained(save_directory, is_main_process=is_main_process, state_dict=state_dict, **kwargs)
        if getattr(self, "token2wav", None) is not None:
            self.save_token2wav(os.path.join(save_directory, self.token2wav_subfolder))

    def save_token2wav(self, directory) -> None:
        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.token2wav.state_dict().items()}
        safetensors.torch.save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(directory, "config.json"), "w") as handle:
            json.dump(self.token2wav.config.to_dict(), handle, indent=2, sort_keys=True)

    def load_token2wav(self, directory) -> None:
        """Load token2wav weights (a folder written by save_pretrained or `python -m minicpmo.convert_token2wav`).

        A model without token2wav (the official config names none) builds it here from the folder's config.json
        (the full-size official layout where the folder has none); every weight of it must then be in the folder."""
        path = os.path.join(directory, "model.safetensors")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no token2wav weights at {path}")
        if getattr(self, "tts", None) is None:
            raise SpeechOutputError("this model was built with init_tts=False; it has no speech decoder for token2wav")
        state = safetensors.torch.load_file(path)
        built_here = getattr(self, "token2wav", None) is None
        if built_here:
            config_path = os.path.join(directory, "config.json")
            values = json.loads(Path(config_path).read_text()) if os.path.isfile(config_path) else {}
            self._attach_token2wav(values or Token2WavConfig())
            self.token2wav.to(device=self.device, dtype=torch.float32)
        missing = set(self.token2wav.state_dict()) - set(state)
        unexpected = set(state) - set(self.token2wav.state_dict())
        if unexpected or (built_here and missing):
            if built_here:
                del self.token2wav
            problem = f"unexpected {sorted(unexpected)[:5]}" if unexpected else f"missing {sorted(missing)[:5]}"
            raise CheckpointError(f"token2wav weights in {path} do not fit its config: {problem}")
        self.token2wav.load_state_dict(state, strict=False)
        self.token2wav_weights_loaded = not missing

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        output = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = output[0] if isinstance(output, tuple) else output
        model.token2wav_weights_loaded = False
        if getattr(model, "token2wav", None) is not None:
            # Kept fp32 (`_keep_in_fp32_modules_strict`); its weights are not in model.safetensors, so transformers'
            # dtype plan never saw them.
            model.token2wav.float()
        if getattr(model, "tts", None) is not None:
            folder = cls._token2wav_folder(str(pretrained_model_name_or_path), kwargs)
            if folder is not None:
                model.load_token2wav(folder)  # builds token2wav from the folder where the config names none
        return output

    @classmethod
    def _token2wav_folder(cls, name_or_path: str, kwargs: dict) -> str | None:
        """The token2wav/ folder of a local checkpoint, or of a Hub repo (fetched like the rest of it)."""
        local = os.path.join(name_or_path, cls.token2wav_subfolder)
        if os.path.isdir(name_or_path):
            return local if os.path.isdir(local) else None
        try:
            from huggingface_hub import snapshot_download

            root = snapshot_download(
                name_or_path, allow_patterns=[f"{cls.token2wav_subfolder}/*"], revision=kwargs.get("revision"),
                cache_dir=kwargs.get("cache_dir"), token=kwargs.get("token"),
            )
        except (OSError, ValueError):  # offline, or no such files: the model works without speech weights
            return None
        remote = os.path.join(root, cls.token2wav_subfolder)
        return remote if os.path.isdir(remote) else None

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self.model.language_model

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        tgt_sizes: torch.LongTensor | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MultimodalCausalLMOutputWithPast:
        """Causal-LM pass over text with images and audio scattered into their placeholder positions.

        Args:
            input_ids: [B, L] token ids with media placeholders (from the processor), or `inputs_embeds` [B, L, D].
            attention_mask, position_ids, cache, use_cache: as in transformers' causal LMs (`cache` is the KV cache).
            pixel_values, tgt_sizes: image slices as patch strips [N, 3, 14, L*14] and their patch grids [N, 2].
            input_features, input_features_mask: log-mel [M, 80, T] of the audio pieces and their frame mask.
            labels: [B, L] targets (-100 ignored), shifted inside the loss.
            logits_to_keep: compute logits for the last n positions only (0: all).

        Returns:
            `MultimodalCausalLMOutputWithPast` with `logits`, `loss` when labels are given, the cache and the
            image / audio encoder outputs (`image_outputs.pooler_output`: what went into the slots).
        """
        kwargs.pop("ref_audio", None)  # the processor's voice prompt: read by generate(return_audio=True) only
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            pixel_values=pixel_values,
            tgt_sizes=tgt_sizes,
            input_features=input_features,
            input_features_mask=input_features_mask,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return MultimodalCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
            audio_outputs=outputs.audio_outputs,
        )

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None, attention_mask=None,
                                      inputs_embeds=None, is_first_iteration: bool = False, **kwargs):
        # `inputs_embeds` is named so that generate() accepts embeddings without input ids (the official chat path
        # generates from embeddings): they feed the prefill, later steps feed the new tokens.
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, cache=cache, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs,
        )
        # Encoder inputs are consumed by the prefill; decode steps only see new text tokens.
        if not is_first_iteration and kwargs.get("use_cache", True):
            model_inputs.pop("tgt_sizes", None)
        return model_inputs


__all__ = [
    "ContextLengthError",
    "MiniCPMOForConditionalGeneration",
    "MiniCPMOModel",
    "MiniCPMOPreTrainedModel",
    "OFFICIAL_BUFFERS",
    "OFFICIAL_KEY_RENAMES",
]
