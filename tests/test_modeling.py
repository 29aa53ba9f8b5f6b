"""MiniCPMOForConditionalGeneration on a tiny random model: merge, loss, generate, batching, attention, dtypes."""

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from helpers import image, processor, tiny_model, tone
from transformers import TextIteratorStreamer

from minicpmo import ContextLengthError, PlaceholderMismatchError


def omni_inputs(question="What is shown and heard?"):
    text = f"<|im_start|>user\n<image>./</image>\n<audio>./</audio>\n{question}<|im_end|>\n<|im_start|>assistant\n"
    return processor()(text=[text], images=[[image(600, 400)]], audio=[[tone(2.0)]], return_tensors="pt")


def test_forward_merges_images_and_audio():
    model = tiny_model()
    inputs = omni_inputs()
    n_slots_image = int(model.model.image_slot_mask(inputs["input_ids"]).sum())
    assert n_slots_image == inputs["pixel_values"].shape[0] * model.config.query_num
    assert int(model.model.audio_slot_mask(inputs["input_ids"]).sum()) == 20  # 2 s -> 20 tokens
    with torch.no_grad():
        out = model(**inputs)
        text_only = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], model.config.vocab_size)
    # The multimodal features change the result; the text path alone differs.
    assert not torch.allclose(out.logits, text_only.logits)


def test_base_model_returns_last_hidden_state_for_trl():
    model = tiny_model()
    inputs = omni_inputs()
    with torch.no_grad():
        hidden = model.base_model(**inputs, use_cache=False).last_hidden_state
        logits = model(**inputs).logits
    assert model.base_model is model.model
    torch.testing.assert_close(model.get_output_embeddings()(hidden), logits)


def test_placeholder_mismatch_is_a_typed_error():
    model = tiny_model()
    inputs = omni_inputs()
    ids = inputs["input_ids"].clone()
    first_slot = model.model.image_slot_mask(ids).nonzero()[0, 1]
    ids[0, first_slot] = 100  # one image slot fewer than features
    with pytest.raises(PlaceholderMismatchError, match="image"):
        model(**{**inputs, "input_ids": ids})


def test_loss_equals_cross_entropy_and_backward_reaches_encoders():
    model = tiny_model(seed=1)
    model.train()
    inputs = omni_inputs()
    labels = inputs["input_ids"].clone()
    labels[:, :-5] = -100
    out = model(**inputs, labels=labels)
    expected = F.cross_entropy(out.logits[0, :-1].float(), labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.model.vpm.embeddings.patch_embedding.weight.grad is not None
    assert model.model.apm.conv1.weight.grad is not None
    model.zero_grad(set_to_none=True)
    model.eval()


def test_merge_is_out_of_place_with_input_require_grads():
    model = tiny_model(seed=2)
    model.enable_input_require_grads()
    try:
        out = model(**omni_inputs(), labels=omni_inputs()["input_ids"])
        out.loss.backward()  # an in-place write into a hooked leaf would raise here
    finally:
        model.disable_input_require_grads()
        model.zero_grad(set_to_none=True)


def test_generate_cached_equals_uncached_and_streamer():
    model = tiny_model()
    inputs = omni_inputs()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=151643)
    cached = model.generate(**inputs, **kwargs)
    uncached = model.generate(**inputs, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    streamer = TextIteratorStreamer(processor().tokenizer, skip_prompt=True)
    thread = threading.Thread(target=model.generate, kwargs=dict(**inputs, **kwargs, streamer=streamer))
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    new_tokens = cached[0, inputs["input_ids"].shape[1] :]
    assert streamed == processor().tokenizer.decode(new_tokens, skip_special_tokens=False)


def test_left_padded_batch_equals_single_runs():
    model = tiny_model()
    proc = processor()
    texts = [
        "<|im_start|>user\n<image>./</image>\nDescribe.<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\n<audio>./</audio>\nA much longer question about the sound you hear?<|im_end|>\n"
        "<|im_start|>assistant\n",
    ]
    media = [dict(images=[[image(448, 448)]]), dict(audio=[[tone(1.0)]])]
    batch = proc(text=texts, images=[[image(448, 448)], []], audio=[[], [tone(1.0)]], return_tensors="pt")
    assert (batch["attention_mask"][:, 0] == 0).any(), "expected left padding"
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=151643)
    batched = model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1] :]
    for i, (text, extra) in enumerate(zip(texts, media)):
        single = proc(text=[text], return_tensors="pt", **extra)
        alone = model.generate(**single, **kwargs)[:, single["input_ids"].shape[1] :]
        assert torch.equal(batched[i], alone[0])


def test_sdpa_and_eager_agree():
    inputs = omni_inputs()
    with torch.no_grad():
        sdpa = tiny_model(attn_implementation="sdpa")(**inputs).logits
        eager = tiny_model(attn_implementation="eager")(**inputs).logits
    torch.testing.assert_close(sdpa, eager, rtol=1e-4, atol=1e-4)


def test_bfloat16_runs_close_to_float32():
    model = tiny_model()
    inputs = omni_inputs()
    with torch.no_grad():
        reference = model(**inputs).logits
        low = copy.deepcopy(model).to(torch.bfloat16)(**inputs).logits
    assert low.dtype == torch.bfloat16
    assert F.cosine_similarity(low.float().flatten(), reference.flatten(), dim=0) > 0.99


def test_gradient_checkpointing_gives_the_same_gradients():
    inputs = omni_inputs()
    labels = inputs["input_ids"]
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(seed=3)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model(**inputs, labels=labels).loss.backward()
        grads.append(model.model.language_model.layers[0].self_attn.q_proj.weight.grad.clone())
        model.zero_grad(set_to_none=True)
        if checkpointing:
            model.activation_checkpointing_disable()
        model.eval()
    torch.testing.assert_close(grads[0], grads[1])


def test_no_split_modules_exist_and_device_map_auto_loads(tmp_path):
    model = tiny_model()
    present = {type(m).__name__ for m in model.modules()}
    assert model._no_split_modules and set(model._no_split_modules) <= present
    model.save_pretrained(tmp_path)
    from minicpmo import MiniCPMOForConditionalGeneration

    reloaded = MiniCPMOForConditionalGeneration.from_pretrained(tmp_path, device_map="auto")
    inputs = omni_inputs()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)


def test_prompt_longer_than_context_is_a_typed_error():
    model = tiny_model()
    ids = torch.full((1, model.config.max_position_embeddings + 1), 100)
    with pytest.raises(ContextLengthError, match="max_position_embeddings"):
        model(input_ids=ids)
