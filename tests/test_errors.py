"""Bad input is refused with a message that says what was wrong and how to fix it, before any compute."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

from vr_hf.tiny import tiny_config

from conftest import build_model, conversation


ENTRY_POINTS = ["forward", "generate"]  # generate encodes the images before its first forward: it must check first


def run(model, entry_point: str, inputs: dict):
    return model(**inputs) if entry_point == "forward" else model.generate(**inputs, max_new_tokens=1)


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


@pytest.mark.parametrize(
    "typo, setting", [("remember_after_layer", "remember_after_layers"), ("downsample_factr", "downsample_factor")]
)
def test_a_misspelled_setting_is_refused_with_the_closest_one(typo, setting):
    refused = f"'{typo}' is not a setting of VisionRememberConfig: did you mean '{setting}'"
    with pytest.raises(ValueError, match=refused):
        tiny_config(**{typo: 0})
    tiny_config(unrelated_note="kept")  # keys far from every setting stay, as Transformers keeps them


def test_invalid_config_is_refused_at_save_too(tmp_path):
    config = tiny_config()
    config.interaction = "sparse"
    with pytest.raises(StrictDataclassClassValidationError, match="interaction='sparse' is unknown"):
        config.save_pretrained(tmp_path)


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_more_image_tokens_than_images(model, prompt_batch, entry_point):
    batch = dict(
        prompt_batch, pixel_values=prompt_batch["pixel_values"][:1], image_sizes=prompt_batch["image_sizes"][:1]
    )
    with pytest.raises(ValueError, match="image tokens but the 1 images need"):
        run(model, entry_point, batch)


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_an_image_cut_short_in_one_sample(model, processor, images, entry_point):
    text = processor.apply_chat_template(conversation("Describe it."), add_generation_prompt=True)
    batch = processor(images=images[:1], text=[text], return_tensors="pt")
    cut = dict(batch, input_ids=batch["input_ids"][:, :20], attention_mask=batch["attention_mask"][:, :20])
    with pytest.raises(ValueError, match="or the text was truncated inside one: raise max_length"):
        run(model, entry_point, cut)


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_truncated_image_tokens(model, processor, images, entry_point):
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
        run(model, entry_point, split)


def test_image_tokens_without_pixel_values_are_plain_tokens(prompt_batch):
    """As in native VLMs (an assistant model in assisted decoding gets no images): placeholders are embedded as the
    ordinary tokens they are."""
    model = build_model()
    input_ids, attention_mask = prompt_batch["input_ids"], prompt_batch["attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        text_only = model.model.language_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    torch.testing.assert_close(logits, model.lm_head(text_only))


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_anyres_without_image_sizes(model, prompt_batch, entry_point):
    batch = {key: value for key, value in prompt_batch.items() if key != "image_sizes"}
    with pytest.raises(ValueError, match="pass image_sizes"):
        run(model, entry_point, batch)


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_pixel_values_of_the_wrong_rank(model, prompt_batch, entry_point):
    batch = dict(prompt_batch, pixel_values=prompt_batch["pixel_values"][0, 0, 0])
    with pytest.raises(ValueError, match="pixel_values has shape"):
        run(model, entry_point, batch)


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_views_of_the_wrong_size(model, prompt_batch, entry_point):
    """Views resized for another vision tower: the model says what size it takes, before the tower runs."""
    pixel_values = torch.nn.functional.interpolate(prompt_batch["pixel_values"].flatten(0, 1), size=(40, 40))
    batch = dict(prompt_batch, pixel_values=pixel_values.unflatten(0, prompt_batch["pixel_values"].shape[:2]))
    with pytest.raises(ValueError, match=r"shape \(2, 3, 3, 40, 40\): expected .*3, 36, 36\)"):
        run(model, entry_point, batch)


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_views_that_do_not_match_image_sizes(model, prompt_batch, entry_point):
    """Flattened `(views, 3, H, W)` pixel values that lack some image's AnyRes tiles, and padded ones for fewer
    images than `image_sizes` names."""
    flattened = dict(prompt_batch, pixel_values=prompt_batch["pixel_values"][:, 0])  # base views only
    with pytest.raises(ValueError, match="do not hold the views of the 2 images of image_sizes"):
        run(model, entry_point, flattened)
    one_image = dict(prompt_batch, pixel_values=prompt_batch["pixel_values"][:1])
    with pytest.raises(ValueError, match="do not hold the views of the 2 images of image_sizes"):
        run(model, entry_point, one_image)


def test_images_cannot_continue_a_cached_sequence(model, prompt_batch):
    """Images with an attention mask longer than the tokens they came with (a cache holds the rest)."""
    continued = dict(prompt_batch, attention_mask=torch.cat([prompt_batch["attention_mask"]] * 2, dim=1))
    with pytest.raises(ValueError, match="images cannot continue a cached sequence"):
        model(**continued)
