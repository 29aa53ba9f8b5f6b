"""Conventions of transformers 5.24 models that tools rely on (issue: "Behaves like a transformers model"), in the
style of transformers' model tests: a ModelTester builds a tiny config and inputs; each test checks one convention
against the model's own dict outputs."""

import os
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from minicpmo import MiniCPMOForConditionalGeneration, tiny_config  # noqa: E402


class MiniCPMOModelTester:
    """Tiny text-only inputs for the full model and its bare backbone."""

    def __init__(self, batch_size: int = 2, seq_length: int = 7, seed: int = 0):
        self.batch_size, self.seq_length, self.seed = batch_size, seq_length, seed

    def prepare_config_and_inputs(self):
        config = tiny_config()
        generator = torch.Generator().manual_seed(self.seed)
        input_ids = torch.randint(0, 1000, (self.batch_size, self.seq_length), generator=generator)
        return config, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def model(self, config):
        torch.manual_seed(self.seed)
        return MiniCPMOForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def tester():
    return MiniCPMOModelTester()


def test_return_dict_false_gives_the_tuple_of_the_dict_outputs(tester):
    config, inputs = tester.prepare_config_and_inputs()
    model = tester.model(config)
    with torch.no_grad():
        as_dict = model(**inputs, labels=inputs["input_ids"])
        as_tuple = model(**inputs, labels=inputs["input_ids"], return_dict=False)
        bare_dict = model.model(**inputs)
        bare_tuple = model.model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(bare_tuple, tuple)
    expected = as_dict.to_tuple()
    assert len(as_tuple) == len(expected)
    for got, want in zip(as_tuple[:2], expected[:2]):  # loss, logits
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(bare_tuple[0], bare_dict.last_hidden_state, rtol=0, atol=0)


def test_past_key_values_is_accepted_as_the_cache_and_continues_the_prompt(tester):
    from transformers import DynamicCache

    config, inputs = tester.prepare_config_and_inputs()
    model = tester.model(config)
    ids = inputs["input_ids"]
    with torch.no_grad():
        full = model(input_ids=ids).logits
        first = model(input_ids=ids[:, :4], past_key_values=DynamicCache(config=config), use_cache=True)
        second = model(input_ids=ids[:, 4:], past_key_values=first.cache, use_cache=True)
        via_cache = model(input_ids=ids[:, 4:], cache=model(input_ids=ids[:, :4], use_cache=True).cache,
                          use_cache=True)
    assert first.cache.get_seq_length() == 4 + ids.shape[1] - 4  # the same cache object grew
    torch.testing.assert_close(second.logits, full[:, 4:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(via_cache.logits, second.logits, rtol=0, atol=0)
    used, ignored = DynamicCache(config=config), DynamicCache(config=config)
    with pytest.warns(FutureWarning, match="Both `past_key_values` and `cache` are set"):  # as 5.24's Qwen3 does
        model(input_ids=ids, cache=used, past_key_values=ignored, use_cache=True)
    assert used.get_seq_length() == ids.shape[1] and ignored.get_seq_length() == 0


def test_default_config_is_the_official_full_size_and_builds():
    from minicpmo import MiniCPMOConfig
    from minicpmo.configuration.configuration_presets import official_config

    default, official = MiniCPMOConfig().to_dict(), official_config().to_dict()
    for values in (default, official):
        values.pop("dtype", None)  # the official file names bfloat16; a bare config leaves the dtype open
        values.pop("transformers_version", None)
    assert default == official
    with torch.device("meta"):
        model = MiniCPMOForConditionalGeneration(MiniCPMOConfig())
    llm = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("model.language_model.", "lm_head")))
    assert 8.1e9 < llm < 8.3e9  # Qwen3-8B with the 151,748-token vocabulary, untied head


def _media_inputs(config, generator):
    patch = config.vision_config.patch_size
    tgt_sizes = torch.tensor([[2, 3], [2, 2]])
    pixel_values = torch.randn(2, 3, patch, 6 * patch, generator=generator)
    input_features = torch.randn(2, config.audio_config.num_mel_bins, 100, generator=generator)
    mask = torch.ones(2, 100, dtype=torch.long)
    mask[1, 60:] = 0
    return pixel_values, tgt_sizes, input_features, mask


def test_feature_getters_follow_the_multimodal_convention(tester):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    config, _ = tester.prepare_config_and_inputs()
    model = tester.model(config)
    pixel_values, tgt_sizes, input_features, mask = _media_inputs(config, torch.Generator().manual_seed(1))
    core = model.model
    with torch.no_grad():
        image = core.get_image_features(pixel_values, tgt_sizes, output_hidden_states=True)
        image_tuple = core.get_image_features(pixel_values, tgt_sizes, return_dict=False)
        audio = core.get_audio_features(input_features, mask, output_hidden_states=True)
        audio_plain = core.get_audio_features(input_features, mask)
    assert isinstance(image, BaseModelOutputWithPooling) and isinstance(audio, BaseModelOutputWithPooling)
    assert image.pooler_output.shape == (2, config.query_num, config.hidden_size)
    assert image.last_hidden_state.shape == (2, 6, config.vision_config.hidden_size)
    assert len(image.hidden_states) == config.vision_config.num_hidden_layers + 1
    torch.testing.assert_close(image_tuple[1], image.pooler_output, rtol=0, atol=0)  # (last, pooled, ...)
    assert audio.last_hidden_state.shape == (2, 50, config.audio_config.d_model)
    assert audio.pooler_output.shape == (10 + 6, config.hidden_size)  # 50 and 30 encoder frames, pooled by 5
    assert len(audio.hidden_states) == config.audio_config.encoder_layers + 1 and audio_plain.hidden_states is None
    torch.testing.assert_close(audio_plain.pooler_output, audio.pooler_output, rtol=0, atol=0)


def test_outputs_carry_the_encoder_outputs_that_filled_the_slots(tester):
    from minicpmo.modeling.modeling_multimodal_merge import scatter_into_slots

    config, _ = tester.prepare_config_and_inputs()
    model = tester.model(config)
    pixel_values, tgt_sizes, input_features, mask = _media_inputs(config, torch.Generator().manual_seed(2))
    c, q = config, config.query_num
    image_span = [c.image_start_token_id] + [c.unk_token_id] * q + [c.image_end_token_id]
    audio_span = [c.audio_start_token_id] + [c.unk_token_id] * 16 + [c.audio_end_token_id]
    ids = torch.tensor([[11, *image_span, *image_span, 12, *audio_span, 13]])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixel_values, tgt_sizes=tgt_sizes, input_features=input_features,
                    input_features_mask=mask)
        embeds = scatter_into_slots(model.get_input_embeddings()(ids), model.model.image_slot_mask(ids),
                                    out.image_outputs.pooler_output.flatten(0, 1), "image")
        embeds = scatter_into_slots(embeds, model.model.audio_slot_mask(ids), out.audio_outputs.pooler_output, "audio")
        again = model(inputs_embeds=embeds)
    assert out.image_outputs.pooler_output.shape == (2, q, c.hidden_size)
    assert out.audio_outputs.pooler_output.shape == (16, c.hidden_size)
    torch.testing.assert_close(again.logits, out.logits, rtol=1e-5, atol=1e-5)


def test_attentions_and_hidden_states_are_returned_with_eager_attention(tester):
    config, inputs = tester.prepare_config_and_inputs()
    config._attn_implementation = "eager"
    model = tester.model(config)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == config.num_hidden_layers and len(out.hidden_states) == config.num_hidden_layers + 1
    assert out.attentions[0].shape == (2, config.num_attention_heads, 7, 7)


def test_fp32_modules_are_only_the_ones_built_and_token2wav_stays_fp32_under_dtype(tmp_path):
    from minicpmo.configuration.configuration_presets import tiny_token2wav_config

    torch.manual_seed(0)
    model = MiniCPMOForConditionalGeneration(tiny_config(token2wav_config=tiny_token2wav_config())).eval()
    without = MiniCPMOForConditionalGeneration(tiny_config(init_tts=False))
    modules = dict(model.named_modules())
    assert model._keep_in_fp32_modules_strict == {"token2wav"} and all(n in modules for n in model._keep_in_fp32_modules_strict)
    assert not without._keep_in_fp32_modules_strict and not without._keep_in_fp32_modules
    model.save_pretrained(tmp_path)
    loaded, info = MiniCPMOForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16,
                                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and loaded.token2wav_weights_loaded
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.token2wav.parameters()} == {torch.float32}
    for name, tensor in model.token2wav.state_dict().items():  # saved fp32, loaded fp32: bit-exact
        torch.testing.assert_close(loaded.token2wav.state_dict()[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip_with_speech_output_has_no_missing_tied_weights(tmp_path, tied):
    from minicpmo.configuration.configuration_presets import tiny_token2wav_config

    torch.manual_seed(0)
    model = MiniCPMOForConditionalGeneration(
        tiny_config(token2wav_config=tiny_token2wav_config(), tie_word_embeddings=tied)
    ).eval()
    model.save_pretrained(tmp_path)
    loaded, info = MiniCPMOForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
    assert (loaded.lm_head.weight is loaded.get_input_embeddings().weight) == tied
    expected, got = model.state_dict(), loaded.state_dict()
    assert set(expected) == set(got)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)


def test_bare_model_round_trips_through_the_full_models_official_layout(tmp_path):
    from safetensors import safe_open

    from minicpmo import MiniCPMOModel

    torch.manual_seed(0)
    full = MiniCPMOForConditionalGeneration(tiny_config(init_tts=False)).eval()
    full.save_pretrained(tmp_path / "full")
    bare, info = MiniCPMOModel.from_pretrained(tmp_path / "full", output_loading_info=True)
    assert info["unexpected_keys"] == {"lm_head.weight"} and not info["missing_keys"]
    bare.save_pretrained(tmp_path / "bare")
    with safe_open(tmp_path / "bare" / "model.safetensors", "pt") as handle:
        assert any(key.startswith("apm.layers.") for key in handle.keys())  # the official apm.* names, as the full
    back, info = MiniCPMOForConditionalGeneration.from_pretrained(tmp_path / "bare", output_loading_info=True)
    assert info["missing_keys"] == {"lm_head.weight"}  # the bare model has no head
    for name, tensor in full.model.state_dict().items():
        torch.testing.assert_close(bare.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(back.model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


def test_tensor_parallel_plan_names_real_parameters_and_shards_the_head_with_the_embeddings():
    for tied in (False, True):
        model = MiniCPMOForConditionalGeneration(tiny_config(init_tts=False, tie_word_embeddings=tied))
        plan = model.tp_plan
        modules = {re.sub(r"\.\d+\.", ".*.", name + ".").rstrip(".") for name, _ in model.named_modules()}
        assert plan and all(rule in modules for rule in plan), sorted(set(plan) - modules)
        assert plan["lm_head"] == "colwise_gather_output"
        assert plan["model.language_model.embed_tokens"] == "embedding_rowwise"  # both split on the vocabulary
        assert plan["model.language_model.layers.*.self_attn.q_proj"] == "colwise"


def test_audio_projector_input_is_the_audio_towers_width():
    config = tiny_config()
    config.audio_config.encoder_ffn_dim = 3 * config.audio_config.d_model  # not Whisper's 4x
    model = MiniCPMOForConditionalGeneration(config)
    assert model.model.audio_projection_layer.linear1.in_features == config.audio_config.d_model
    features = torch.randn(1, config.audio_config.num_mel_bins, 100)
    with torch.no_grad():
        assert model.model.get_audio_features(features).pooler_output.shape == (10, config.hidden_size)
