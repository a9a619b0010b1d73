"""Numerical behaviour of LLaVA-VR against simple references."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

from vr_hf import VisionRememberForConditionalGeneration
from vr_hf.tiny import tiny_config

from conftest import active_model, build_model, conversation, prompt_end_unknown


def training_example(processor, image, answer: str):
    text = processor.apply_chat_template(conversation("What shape is drawn here?", answer))
    batch = processor(images=[image], text=[text], return_tensors="pt")
    prompt = processor.apply_chat_template(conversation("What shape is drawn here?"), add_generation_prompt=True)
    prompt_length = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
    labels = batch["input_ids"].clone()
    labels[:, :prompt_length] = -100
    return batch, labels, prompt_length


def vision_remember_parameters(model):
    return dict(model.model.vision_remember.named_parameters())


def test_identity_at_initialisation(prompt_batch):
    with_remember = build_model()
    without_remember = build_model(use_vision_remember=False)
    missing, unexpected = without_remember.load_state_dict(with_remember.state_dict(), strict=False)
    assert not missing and all(".vision_remember." in key for key in unexpected)

    logits = with_remember(**prompt_batch).logits
    assert torch.equal(logits, without_remember(**prompt_batch).logits)


def test_training_step_reaches_every_vision_remember_parameter(processor, images):
    model = build_model().train()
    batch, labels, _ = training_example(processor, images[0], "A circle.")
    parameters = vision_remember_parameters(model)
    optimizer = torch.optim.Adam(parameters.values(), lr=1e-2)
    with torch.no_grad():
        before = model(**batch).logits

    for _ in range(2):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    # At initialisation only the zeroed output projections get gradients; after one step, everything does.
    silent = [name for name, parameter in parameters.items() if not parameter.grad.abs().sum() > 0]
    assert not silent, f"no gradient reached {silent}"
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, before)


def test_answer_never_reaches_prompt_positions(processor, images):
    model = active_model()
    first, labels_first, prompt_length = training_example(processor, images[0], "A red circle.")
    second, labels_second, _ = training_example(processor, images[0], "Two blue bars")
    assert first["input_ids"].shape == second["input_ids"].shape
    assert not torch.equal(first["input_ids"], second["input_ids"])

    def prompt_logits(batch, **kwargs):
        return model(**batch, **kwargs).logits[:, :prompt_length]

    # With labels (training), and without them: the prompt ends after its chat template's generation prompt.
    assert torch.equal(prompt_logits(first, labels=labels_first), prompt_logits(second, labels=labels_second))
    assert torch.equal(prompt_logits(first), prompt_logits(second))
    # The reference: pooling the whole text into the text-guided token, the answer does reach the prompt.
    with prompt_end_unknown(model):
        leaked = prompt_logits(first), prompt_logits(second)
    assert not torch.allclose(*leaked)


def greedy(model, batch, **kwargs):
    output = model.generate(
        **batch, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True, **kwargs
    )
    return output.sequences, torch.stack(output.logits, dim=1)


def test_cached_generation_equals_uncached(prompt_batch):
    model = active_model()
    cached, cached_logits = greedy(model, prompt_batch, use_cache=True)
    uncached, uncached_logits = greedy(model, prompt_batch, use_cache=False)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_logits, uncached_logits, atol=1e-4, rtol=1e-4)


def test_beam_search_keeps_each_sample_with_its_own_image(prompt_batch):
    """Beams expand each sample with its image: the first step keeps the top tokens of each sample's own prefill."""
    model = active_model()
    with torch.no_grad():
        logits = model(**prompt_batch).logits[:, -1]
    assert not torch.equal(logits[0], logits[1])
    beams = model.generate(**prompt_batch, max_new_tokens=1, num_beams=3, num_return_sequences=3)
    assert torch.equal(beams[:, prompt_batch["input_ids"].shape[1]], logits.topk(3).indices.flatten())


def test_left_padded_batch_equals_samples_one_by_one(processor, images):
    model = active_model()
    prompts = [
        processor.apply_chat_template(conversation("What is in the picture?"), add_generation_prompt=True),
        processor.apply_chat_template(conversation("Colour?"), add_generation_prompt=True),
    ]
    batch = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any(), "the batch must be left-padded for this test to mean anything"
    sequences, logits = greedy(model, batch)
    for index, (image, prompt) in enumerate(zip(images, prompts)):
        single = processor(images=[image], text=[prompt], return_tensors="pt")
        single_sequences, single_logits = greedy(model, single)
        new_tokens = sequences[index, batch["input_ids"].shape[1] :]
        assert torch.equal(new_tokens, single_sequences[0, single["input_ids"].shape[1] :])
        torch.testing.assert_close(logits[index], single_logits[0], atol=1e-4, rtol=1e-4)


def test_eager_equals_sdpa(prompt_batch, monkeypatch):
    sdpa_calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: sdpa_calls.append(1) or sdpa(*a, **k)
    )
    logits = {}
    for implementation in ("eager", "sdpa"):
        model = active_model(interaction="global")
        model.set_attn_implementation(implementation)
        sdpa_calls.clear()
        logits[implementation] = model(**prompt_batch).logits
        assert bool(sdpa_calls) == (implementation == "sdpa")
    attended = prompt_batch["attention_mask"].bool()  # padded positions attend to nothing: their logits are arbitrary
    torch.testing.assert_close(logits["eager"][attended], logits["sdpa"][attended], atol=1e-5, rtol=1e-4)


def gradients(model, batch, labels) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(**batch, labels=labels).loss.backward()
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(processor, images, use_reentrant):
    model = active_model().train()
    batch, labels, _ = training_example(processor, images[0], "A circle.")
    plain = gradients(model, batch, labels)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    checkpointed = gradients(model, batch, labels)
    assert plain.keys() == checkpointed.keys()
    assert any(".vision_remember." in name for name in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_text_only_samples(processor, images):
    model = active_model()
    texts = [
        processor.apply_chat_template(conversation("Hello there", image=False), add_generation_prompt=True),
        processor.apply_chat_template(conversation("And this?"), add_generation_prompt=True),
    ]
    mixed = processor(images=[images[0]], text=texts, padding=True, return_tensors="pt")
    text_only = processor(text=texts[:1], return_tensors="pt")
    mixed_sequences, _ = greedy(model, mixed)
    text_sequences, _ = greedy(model, text_only)
    assert torch.equal(
        mixed_sequences[0, mixed["input_ids"].shape[1] :], text_sequences[0, text_only["input_ids"].shape[1] :]
    )
    assert model(**text_only).logits.isfinite().all()


def test_torch_compile_matches_eager(prompt_batch):
    model = active_model()
    expected = model(**prompt_batch).logits
    # aot_eager traces the same graphs as inductor without its minutes of C++ code generation on a CPU.
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(**prompt_batch).logits, expected, atol=1e-4, rtol=1e-4)


def test_vision_remember_runs_only_in_prefill(prompt_batch, monkeypatch):
    model = active_model()
    calls = []
    block = model.model.vision_remember.layers["0"]
    original = block.forward
    monkeypatch.setattr(block, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    model.generate(**prompt_batch, max_new_tokens=4, do_sample=False)
    assert len(calls) == 1


def test_baseline_has_no_vision_remember_parameters():
    model = VisionRememberForConditionalGeneration(tiny_config(use_vision_remember=False))
    assert not any("vision_remember" in name for name, _ in model.named_parameters())


def test_a_baseline_and_its_vision_remember_model_start_from_the_same_weights():
    """Vision Remember draws its random numbers from a stream of its own: a fair ablation compares models that share
    every other weight, for the same seed."""
    torch.manual_seed(0)
    with_remember = VisionRememberForConditionalGeneration(tiny_config(identity_init=False)).state_dict()
    torch.manual_seed(0)
    baseline = VisionRememberForConditionalGeneration(tiny_config(use_vision_remember=False)).state_dict()
    for name, tensor in baseline.items():
        assert torch.equal(with_remember[name], tensor), name
    torch.manual_seed(0)
    again = VisionRememberForConditionalGeneration(tiny_config(identity_init=False)).state_dict()
    assert all(torch.equal(again[name], tensor) for name, tensor in with_remember.items())
    block = "model.vision_remember.layers.0.self_attention"
    assert not torch.equal(with_remember[f"{block}.q_proj.weight"], with_remember[f"{block}.v_proj.weight"])


def test_a_baseline_is_not_checked_against_settings_it_does_not_use():
    two_layers = dict(tiny_config().text_config.to_dict(), num_hidden_layers=2, layer_types=None)
    tiny_config(use_vision_remember=False, text_config=two_layers, remember_after_layers=[0, 3])
    with pytest.raises(StrictDataclassClassValidationError, match="remember_after_layers has index 3"):
        tiny_config(text_config=two_layers, remember_after_layers=[0, 3])


def test_other_vision_towers_and_decoders(prompt_batch):
    """CLIP (with a CLS token to drop) and Llama work through the same code as SigLIP and Qwen2."""
    tiny = tiny_config()
    vision_config = dict(tiny.vision_config.to_dict(), model_type="clip_vision_model")
    text_config = dict(tiny.text_config.to_dict(), model_type="llama")
    overrides = dict(vision_config=vision_config, text_config=text_config, vision_feature_select_strategy="default")
    with_remember = active_model(**overrides)
    without_remember = build_model(use_vision_remember=False, **overrides)
    assert type(with_remember.model.vision_tower).__name__ == "CLIPVisionModel"
    assert type(with_remember.model.language_model).__name__ == "LlamaModel"
    without_remember.load_state_dict(with_remember.state_dict(), strict=False)

    logits = with_remember(**prompt_batch).logits
    assert logits.isfinite().all()
    assert not torch.allclose(logits, without_remember(**prompt_batch).logits)
    sequences, _ = greedy(with_remember, prompt_batch)
    assert sequences.shape[1] == prompt_batch["input_ids"].shape[1] + 6
