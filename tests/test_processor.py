"""The processor writes exactly as many image tokens as the model makes vision tokens, for any image size."""

import json
from pathlib import Path

import pytest
import torch

from vr_hf import VisionRememberProcessor
from vr_hf.processor import build_processor, load_processor
from vr_hf.tiny import byte_tokenizer, tiny_config

from conftest import build_model, conversation, random_image
from tiny_grafts import grafted_checkpoint


SIZES = [(36, 36), (20, 72), (72, 20), (50, 90), (90, 50), (7, 200), (200, 7), (123, 61), (1, 1), (300, 300)]


@pytest.mark.parametrize("anyres", [True, False], ids=["anyres", "single-view"])
def test_image_tokens_match_the_vision_tokens_the_model_makes(tokenizer, anyres):
    overrides = {} if anyres else {"image_grid_pinpoints": None}
    model = build_model(**overrides)
    processor = build_processor(model.config, tokenizer)
    images = [random_image(height, width, seed=index) for index, (height, width) in enumerate(SIZES)]
    text = processor.apply_chat_template(conversation("Which?"), add_generation_prompt=True)
    batch = processor(images=images, text=[text] * len(images), padding=True, return_tensors="pt")

    written = (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    with torch.no_grad():
        made = model.model.get_image_features(batch["pixel_values"], batch.get("image_sizes")).pooler_output
    assert written == [len(tokens) for tokens in made]
    expected = [model.model.image_layout.num_tokens(size if anyres else None) for size in SIZES]
    assert written == expected
    assert len(set(written)) > 1 if anyres else set(written) == {model.config.tokens_per_side**2}


def test_chat_template_marks_exactly_the_answers(processor):
    messages = conversation("Name the shape.", "A circle.") + [
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
    ]
    image = random_image(40, 40)
    messages[0]["content"][0]["image"] = image
    encoded = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = encoded["input_ids"][0], encoded["assistant_masks"][0]
    marked = processor.tokenizer.decode([token for token, marked in zip(ids, mask) if marked])
    assert marked == "A circle.<|im_end|>Yes.<|im_end|>"


def test_generation_prompt_and_batch_decode(processor):
    prompt = processor.apply_chat_template(conversation("Hi", image=False), add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = processor(text=[prompt, "plain"], padding=True, return_tensors="pt")["input_ids"]
    assert processor.batch_decode(ids, skip_special_tokens=True) == ["user\nHi\nassistant\n", "plain"]


def test_unknown_image_token_is_refused(tokenizer):
    with pytest.raises(ValueError, match="does not know image_token"):
        VisionRememberProcessor(image_processor=None, tokenizer=tokenizer, image_token="<image>")


@pytest.mark.parametrize("name", ["llava_vr", "qwen2_5_vl"])
def test_a_checkpoint_without_its_tokenizer_json_is_refused_at_load(tmp_path, name):
    """A real tokenizer (Qwen2's class) saved without tokenizer.json loads with almost no vocabulary: refused when
    the processor loads, naming the missing file (LLaVA-VR's processor names it itself)."""
    folder = tmp_path / name
    if name == "llava_vr":
        build_model().save_pretrained(folder)
        build_processor(tiny_config(), byte_tokenizer()).save_pretrained(folder)
    else:
        folder = Path(grafted_checkpoint(tmp_path, name))
    (folder / "tokenizer.json").unlink()
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "tokenizer_class": "Qwen2Tokenizer"}))
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_processor(str(folder))


def test_build_processor_names_a_missing_image_token():
    config = tiny_config(image_token_id=300)
    with pytest.raises(ValueError, match="no token at config.image_token_id=300 .* add the image token"):
        build_processor(config, byte_tokenizer())
