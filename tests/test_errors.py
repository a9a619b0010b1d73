"""Bad input is refused with a message that says what was wrong and how to fix it, before any compute."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

from vr_hf.tiny import tiny_config

from conftest import build_model, conversation


@pytest.fixture
def model(monkeypatch):
    model = build_model()
    tower = model.model.vision_tower

    def refuse(*args, **kwargs):
        raise AssertionError("the vision tower ran before the input was checked")

    monkeypatch.setattr(tower, "forward", refuse)
    return model


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"projector_type": "qformer"}, "projector_type='qformer' is unknown"),
        ({"interaction": "sparse"}, "interaction='sparse' is unknown"),
        ({"remember_after_layers": [0, 4]}, "remember_after_layers has index 4"),
        ({"remember_after_layers": [3]}, "after the last layer"),
        ({"remember_after_layers": [-1]}, "remember_after_layers has index -1"),
        ({"vision_feature_layers": [1, 9]}, "vision_feature_layers has index 9"),
        ({"projector_feature_layer": -5}, "projector_feature_layer has index -5"),
        ({"downsample_factor": 5}, "does not tile the 12x12 feature map"),
        ({"cross_attention_heads": 5}, "cross_attention_heads=5 does not divide"),
        ({"remember_after_layers": [1, 1]}, "repeats a layer"),
        ({"projector_type": "perceiver"}, "use interaction='global'"),
    ],
)
def test_invalid_config(overrides, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        tiny_config(**overrides)


def test_invalid_config_is_refused_at_save_too(tmp_path):
    config = tiny_config()
    config.interaction = "sparse"
    with pytest.raises(StrictDataclassClassValidationError, match="interaction='sparse' is unknown"):
        config.save_pretrained(tmp_path)


def test_more_image_tokens_than_images(model, prompt_batch):
    batch = dict(
        prompt_batch, pixel_values=prompt_batch["pixel_values"][:1], image_sizes=prompt_batch["image_sizes"][:1]
    )
    with pytest.raises(ValueError, match="image tokens but the 1 images need"):
        model(**batch)


def test_truncated_image_tokens(model, processor, images):
    text = processor.apply_chat_template(conversation("Describe it."), add_generation_prompt=True)
    two_images = text + text
    batch = processor(images=images, text=[two_images], return_tensors="pt")
    image_token = model.config.image_token_id
    positions = (batch["input_ids"][0] == image_token).nonzero().flatten()
    # Cut the first image's tokens short and move them into a second sample: totals match, boundaries do not.
    cut = int(positions[5])
    first, second = batch["input_ids"][:, :cut], batch["input_ids"][:, cut:]
    width = max(first.shape[1], second.shape[1])
    pad = lambda ids: torch.nn.functional.pad(ids, (width - ids.shape[1], 0), value=0)  # noqa: E731
    split = dict(batch, input_ids=torch.cat([pad(first), pad(second)]))
    split.pop("attention_mask")
    with pytest.raises(ValueError, match="sample 0 ends in the middle of an image"):
        model(**split)


def test_image_tokens_without_pixel_values_are_plain_tokens(prompt_batch):
    """As in native VLMs (an assistant model in assisted decoding gets no images): placeholders are embedded as the
    ordinary tokens they are."""
    model = build_model()
    input_ids, attention_mask = prompt_batch["input_ids"], prompt_batch["attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        text_only = model.model.language_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    torch.testing.assert_close(logits, model.lm_head(text_only))


def test_anyres_without_image_sizes(model, prompt_batch):
    batch = {key: value for key, value in prompt_batch.items() if key != "image_sizes"}
    with pytest.raises(ValueError, match="pass image_sizes"):
        model(**batch)


def test_pixel_values_of_the_wrong_rank(model, prompt_batch):
    batch = dict(prompt_batch, pixel_values=prompt_batch["pixel_values"][0, 0, 0])
    with pytest.raises(ValueError, match="pixel_values has shape"):
        model(**batch)
