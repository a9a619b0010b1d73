"""Building LLaVA-VR from pretrained parts: weights copied untouched, new parts initialised, tokens added, output
written atomically, bad input refused before anything is written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from vr_hf import VisionRememberForConditionalGeneration
from vr_hf.conversion import ConversionError, build_from_parts
from vr_hf.tiny import TINY_TEXT, TINY_VISION, byte_tokenizer


ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "conversion" / "build_llava_vr.py"
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
PINPOINTS = [[36, 72], [72, 36], [72, 72]]
TINY = dict(remember_after_layers=[0, 2], cross_attention_heads=4)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Tiny random pretrained parts saved like Hub checkpoints: a SigLIP tower, a tied Qwen2, an untied Llama."""
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    vision = SiglipVisionConfig(**{key: value for key, value in TINY_VISION.items() if key != "model_type"})
    SiglipVisionModel(vision).save_pretrained(root / "siglip")

    # Byte-level tokenizers without the vision tokens: the conversion must add them.
    qwen_tokenizer = byte_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    qwen_config = {key: value for key, value in TINY_TEXT.items() if key != "model_type"}
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(qwen_tokenizer), **qwen_config))
    qwen.save_pretrained(root / "qwen2")
    qwen_tokenizer.save_pretrained(root / "qwen2")

    # No ChatML tokens either, and a vocabulary larger than the tokenizer (as Qwen2's padded one is).
    llama_tokenizer = byte_tokenizer(["<|endoftext|>"], eos_token="<|endoftext|>")
    llama_tokenizer.padding_side = "right"  # as Llama's tokenizers pad
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(llama_tokenizer) + 2,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        )
    )
    llama.save_pretrained(root / "llama")
    llama_tokenizer.save_pretrained(root / "llama")
    return root


@pytest.fixture(scope="module")
def converted(parts, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    return {
        "qwen2": build_from_parts(
            str(parts / "siglip"), str(parts / "qwen2"), str(out / "qwen2-vr"), image_grid_pinpoints=PINPOINTS, **TINY
        ),
        "llama": build_from_parts(
            str(parts / "siglip"),
            str(parts / "llama"),
            str(out / "llama-vr"),
            projector_type="pixel_shuffle",
            downsample_factor=2,
            remember_after_layers=[1],
            cross_attention_heads=4,
        ),
    }


def image(height=40, width=90):
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def leftovers(folder: Path) -> list[str]:
    return [name for name in os.listdir(folder) if ".partial-" in name or ".old-" in name]


@pytest.mark.parametrize("decoder", ["qwen2", "llama"])
def test_pretrained_weights_are_untouched(parts, converted, decoder):
    model, info = VisionRememberForConditionalGeneration.from_pretrained(converted[decoder], output_loading_info=True)
    assert {key: value for key, value in info.items() if value} == {}

    vision = SiglipVisionModel.from_pretrained(parts / "siglip").state_dict()
    tower = model.model.vision_tower.state_dict()
    assert tower.keys() == vision.keys()
    for name, tensor in vision.items():
        assert torch.equal(tower[name], tensor), f"vision tower weight {name} changed"

    original = AutoModelForCausalLM.from_pretrained(parts / decoder)
    old_vocab = original.config.vocab_size
    expected, actual = original.base_model.state_dict(), model.model.language_model.state_dict()
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        if name == "embed_tokens.weight":
            assert torch.equal(actual[name][:old_vocab], tensor), "original embedding rows changed"
        else:
            assert torch.equal(actual[name], tensor), f"decoder weight {name} changed"
    head = original.get_output_embeddings().weight
    assert torch.equal(model.lm_head.weight[:old_vocab], head)
    assert model.lm_head.weight.shape[0] == model.config.text_config.vocab_size


def test_tokens_added_and_new_parts_exist(parts, converted):
    for decoder, folder in converted.items():
        original = AutoTokenizer.from_pretrained(parts / decoder)
        assert not set(VISION_TOKENS) & set(original.get_vocab())
        tokenizer = AutoTokenizer.from_pretrained(folder)
        config = json.loads((Path(folder) / "config.json").read_text())
        for token in VISION_TOKENS + ["<|im_start|>", "<|im_end|>"]:
            assert token in tokenizer.get_vocab()
        assert config["image_token_id"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert config["text_config"]["vocab_size"] >= len(tokenizer)
        assert config["auto_map"]["AutoModelForImageTextToText"].endswith("VisionRememberForConditionalGeneration")
        card = (Path(folder) / "README.md").read_text()
        assert "trust_remote_code=True" in card and str(parts / decoder) in card
        assert not leftovers(Path(folder).parent)

    # The Llama's vocabulary had 2 spare rows: the first two new tokens fit in it, the rest grow it.
    llama_config = json.loads((Path(converted["llama"]) / "config.json").read_text())
    assert llama_config["text_config"]["vocab_size"] == len(AutoTokenizer.from_pretrained(converted["llama"]))

    model = VisionRememberForConditionalGeneration.from_pretrained(converted["qwen2"])
    assert model.model.image_newline is not None
    assert model.model.vision_remember is not None and model.config.remember_after_layers == [0, 2]
    assert model.config.vision_feature_layers == [0, 1, 2]
    assert sum(p.numel() for p in model.model.multi_modal_projector.parameters()) > 0
    assert sum(p.numel() for p in model.model.vision_remember.parameters()) > 0
    llama = VisionRememberForConditionalGeneration.from_pretrained(converted["llama"])
    assert llama.config.projector_type == "pixel_shuffle" and not llama.config.tie_word_embeddings
    assert llama.model.image_newline is None


@pytest.mark.parametrize("decoder", ["qwen2", "llama"])
def test_text_logits_equal_original_decoder(parts, converted, decoder):
    original = AutoModelForCausalLM.from_pretrained(parts / decoder).eval()
    model = VisionRememberForConditionalGeneration.from_pretrained(converted[decoder]).eval()
    input_ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = original(input_ids).logits
        actual = model(input_ids=input_ids).logits
    old_vocab = original.config.vocab_size
    torch.testing.assert_close(actual[..., :old_vocab], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("decoder", ["qwen2", "llama"])
def test_converted_checkpoint_generates(converted, decoder):
    folder = converted[decoder]
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert type(model) is VisionRememberForConditionalGeneration
    messages = [{"role": "user", "content": [{"type": "image", "image": image()}, {"type": "text", "text": "Hi?"}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) > 0
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.isfinite(logits).all()
    assert generated.shape[1] > inputs["input_ids"].shape[1]
    assert isinstance(processor.decode(generated[0, inputs["input_ids"].shape[1] :]), str)


@pytest.mark.parametrize("decoder", ["qwen2", "llama"])
def test_a_batch_generates_what_each_prompt_generates_alone(converted, decoder):
    """The converted processor pads on the left whatever the decoder's tokenizer did (Llama's pads on the right), so
    a batch's prompts end where generation starts."""
    folder = converted[decoder]
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    with torch.no_grad():
        for module in model.model.vision_remember.modules():  # make Vision Remember matter, as a trained one does
            if type(module).__name__ == "OutputProjection":
                module.weight.normal_(std=0.5)
    assert processor.tokenizer.padding_side == "left"
    questions = ["Hi?", "What is in this picture, in a few words?"]
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
            add_generation_prompt=True,
        )
        for text in questions
    ]
    images = [image(), image(60, 30)]

    def generate(indices):
        inputs = processor(
            images=[images[i] for i in indices], text=[prompts[i] for i in indices], padding=True, return_tensors="pt"
        )
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        return output[:, inputs["input_ids"].shape[1] :]

    batch = generate([0, 1])
    assert torch.equal(batch[0], generate([0])[0]) and torch.equal(batch[1], generate([1])[0])


def test_bad_input_raises_and_writes_nothing(parts, tmp_path):
    vision, text = str(parts / "siglip"), str(parts / "qwen2")
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="no such folder"):
        build_from_parts(str(tmp_path / "missing"), text, str(out), **TINY)
    with pytest.raises(FileNotFoundError, match="text_model"):
        build_from_parts(vision, str(tmp_path / "missing"), str(out), **TINY)
    with pytest.raises(ValueError, match="remember_after_layers"):
        build_from_parts(vision, text, str(out), remember_after_layers=[0, 7], cross_attention_heads=4)
    with pytest.raises(ValueError, match="downsample_factor"):
        build_from_parts(vision, text, str(out), downsample_factor=5, **TINY)
    with pytest.raises(ConversionError, match="decoder-only"):
        build_from_parts(vision, vision, str(out), **TINY)  # a vision model is no decoder
    assert not out.exists()
    assert os.listdir(tmp_path) == []

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        build_from_parts(vision, text, str(out), **TINY)
    assert os.listdir(out) == ["keep.txt"]

    build_from_parts(vision, text, str(out), overwrite=True, **TINY)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_cli(parts, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    help_run = subprocess.run(
        [sys.executable, str(CLI), "--help"], capture_output=True, text=True, env=env, timeout=60
    )
    assert help_run.returncode == 0, help_run.stderr
    flags = ("--projector-type", "--downsample-factor", "--remember-after-layers", "--anyres", "--overwrite")
    for flag in (*flags, "--refusion", "--fastv-layer", "--fastv-keep-ratio"):
        assert flag in help_run.stdout
    assert "example:" in help_run.stdout

    out = tmp_path / "cli-vr"
    command = [sys.executable, str(CLI), "--vision-model", str(parts / "siglip"), "--text-model", str(parts / "qwen2")]
    command += ["--output-dir", str(out), "--remember-after-layers", "0", "2", "--projector-type", "avg_pool"]
    command += ["--downsample-factor", "3", "--anyres", "--cross-attention-heads", "4", "--no-text-guidance"]
    run = subprocess.run(command + ["--refusion", "sva"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["cross_attention_heads"] == 4 and config["text_guidance"] is False and config["refusion"] == "sva"
    assert config["remember_after_layers"] == [0, 2] and config["image_grid_pinpoints"] == [
        [36, 72],
        [72, 36],
        [72, 72],
    ]

    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 1 and "not empty" in again.stderr

    fastv = command[:6] + ["--output-dir", str(tmp_path / "cli-fastv"), "--no-vision-remember", "--fastv-layer", "1"]
    run = subprocess.run(fastv + ["--fastv-keep-ratio", "0.25"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    config = json.loads((tmp_path / "cli-fastv" / "config.json").read_text())
    assert (config["use_vision_remember"], config["fastv_layer"], config["fastv_keep_ratio"]) == (False, 1, 0.25)
