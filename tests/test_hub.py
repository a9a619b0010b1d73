"""Hub format: a saved folder holds safetensors, an `auto_map` and the remote code, and loads without `vr_hf`.

The remote-code checks run in a fresh Python process in which `import vr_hf` fails, so every class must come from
the folder (`transformers_modules`) through the Auto classes and `trust_remote_code=True`.
"""

import copy
import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

import vr_hf.modeling
from vr_hf import (
    VisionRememberConfig,
    VisionRememberForConditionalGeneration,
    VisionRememberModel,
    VisionRememberProcessor,
)
from vr_hf.modeling.vision_remember import OutputProjection
from vr_hf.processor import build_processor
from vr_hf.tiny import byte_tokenizer, tiny_config


REMOTE_CODE_FILES = [
    "configuration_llava_vr.py",
    "configuration_vision_remember_settings.py",
    "modeling_llava_vr.py",
    "modeling_vision_remember_base.py",
    "vision_remember.py",
    "vision_remember_attention.py",
    "vision_remember_triton.py",
    "conversation_turns.py",
    "deepstack.py",
    "fastv.py",
    "spatial_vision_aggregator.py",
    "projectors.py",
    "image_layout.py",
    "processing_llava_vr.py",
]
MODEL_AUTO_MAP = {
    "AutoConfig": "configuration_llava_vr.VisionRememberConfig",
    "AutoModel": "modeling_llava_vr.VisionRememberModel",
    "AutoModelForImageTextToText": "modeling_llava_vr.VisionRememberForConditionalGeneration",
}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_llava_vr.VisionRememberProcessor"}
PROMPT = "What is in the picture?"
MAX_NEW_TOKENS = 4

# Runs in a fresh interpreter: loads the folder through the Auto classes and a pipeline, with `vr_hf` blocked.
REMOTE_SCRIPT = r"""
import json
import sys

sys.modules["vr_hf"] = None  # `import vr_hf` now raises ImportError: only the folder's remote code can be used

import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline

folder, image_path, prompt, max_new_tokens, output = sys.argv[1:]
try:
    import vr_hf  # noqa: F401

    package_importable = True
except ImportError:
    package_importable = False

config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
base_model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)

image = Image.open(image_path).convert("RGB")
messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
inputs = processor.apply_chat_template(
    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
)
with torch.no_grad():
    logits = model(**inputs).logits
    last_hidden_state = base_model(**inputs).last_hidden_state

generator = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
answer = generator(text=messages, max_new_tokens=int(max_new_tokens), return_full_text=False)

tensors = dict(inputs, logits=logits, last_hidden_state=last_hidden_state)
save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, output + ".safetensors")
report = {
    "package_importable": package_importable,
    "loaded_vr_hf_modules": [name for name, module in sys.modules.items() if name.startswith("vr_hf") and module],
    "modules": {
        name: type(obj).__module__
        for name, obj in [("config", config), ("base_model", base_model), ("model", model), ("processor", processor)]
    },
    "answer": [{key: value for key, value in item.items() if key != "input_text"} for item in answer],
}
with open(output + ".json", "w") as file:
    json.dump(report, file)
"""


def make_image() -> Image.Image:
    """A fixed 50x90 image: AnyRes tiles it 2x2, then unpadding keeps 4 of the 8 token rows of the tile grid."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(50, 90, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def make_inputs(processor, image: Image.Image):
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": PROMPT}]}]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def perturb_vision_remember(model):
    """Give every Vision Remember output projection random weights: at init they are zero and change nothing."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, OutputProjection):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.2)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model with active Vision Remember and its processor, saved to a folder."""
    torch.manual_seed(0)
    config = tiny_config()
    model = VisionRememberForConditionalGeneration(config).eval()
    perturb_vision_remember(model)
    processor = build_processor(config, byte_tokenizer())
    folder = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image = make_image()
    inputs = make_inputs(processor, image)
    with torch.no_grad():
        logits = model(**inputs).logits
    return {
        "folder": folder,
        "model": model,
        "processor": processor,
        "image": image,
        "inputs": inputs,
        "logits": logits,
    }


@pytest.fixture(scope="module")
def remote(checkpoint, tmp_path_factory):
    """Outputs of `REMOTE_SCRIPT` on the saved folder, run in a fresh interpreter without `vr_hf`."""
    work = tmp_path_factory.mktemp("remote")
    script, image_path, output = work / "load_remote.py", work / "image.png", work / "outputs"
    script.write_text(REMOTE_SCRIPT)
    checkpoint["image"].save(image_path)  # PNG is lossless: the same pixels as in this process
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_HOME=str(work / "hf_home"),
        HF_MODULES_CACHE=str(work / "modules"),
        TRANSFORMERS_VERBOSITY="error",
        OMP_NUM_THREADS=str(torch.get_num_threads()),  # the same reduction order as this process: bitwise-equal logits
    )
    command = [sys.executable, "-I", str(script), str(checkpoint["folder"]), str(image_path), PROMPT]
    command += [str(MAX_NEW_TOKENS), str(output)]
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"loading the folder in a fresh process failed:\n{result.stderr[-4000:]}"
    report = json.loads(Path(f"{output}.json").read_text())
    report["tensors"] = load_file(f"{output}.safetensors")
    return report


def test_save_pretrained_writes_hub_format(checkpoint):
    folder = checkpoint["folder"]
    assert (folder / "model.safetensors").is_file()
    assert not (folder / "pytorch_model.bin").exists()

    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == MODEL_AUTO_MAP
    assert config["architectures"] == ["VisionRememberForConditionalGeneration"]
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"] == PROCESSOR_AUTO_MAP

    source = Path(vr_hf.modeling.__file__).parent
    for name in REMOTE_CODE_FILES:
        assert filecmp.cmp(folder / name, source / name, shallow=False), f"{name} is missing or stale"
    assert not (folder / "__init__.py").exists()


def test_vision_remember_changes_logits(checkpoint):
    """The checks below only prove the Vision Remember weights round-trip if those weights matter."""
    model = copy.deepcopy(checkpoint["model"])
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, OutputProjection):
                module.weight.zero_()
                module.bias.zero_()
        logits = model(**checkpoint["inputs"]).logits
    assert not torch.allclose(logits, checkpoint["logits"])


def test_reload_in_process(checkpoint):
    model, folder = checkpoint["model"], checkpoint["folder"]
    reloaded, loading_info = VisionRememberForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    reloaded.eval()
    assert {key: value for key, value in loading_info.items() if value} == {}

    expected, actual = model.state_dict(), reloaded.state_dict()
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), f"{name} differs after reload"
    with torch.no_grad():
        assert torch.equal(reloaded(**checkpoint["inputs"]).logits, checkpoint["logits"])


def test_auto_classes_use_package_in_process(checkpoint):
    """With `vr_hf` imported, the Auto classes load the folder with the package's own classes, no remote code."""
    folder = checkpoint["folder"]
    assert type(AutoConfig.from_pretrained(folder)) is VisionRememberConfig
    assert type(AutoModel.from_pretrained(folder)) is VisionRememberModel
    assert type(AutoModelForImageTextToText.from_pretrained(folder)) is VisionRememberForConditionalGeneration
    assert type(AutoProcessor.from_pretrained(folder)) is VisionRememberProcessor


def test_remote_code_is_used_without_package(remote):
    assert not remote["package_importable"]
    assert remote["loaded_vr_hf_modules"] == []
    for name, module in remote["modules"].items():
        assert module.startswith("transformers_modules."), f"{name} came from {module}"


def test_remote_code_reproduces_logits(checkpoint, remote):
    tensors, inputs = remote["tensors"], checkpoint["inputs"]
    assert inputs["image_sizes"].tolist() == [[50, 90]]
    for name in ("input_ids", "attention_mask", "pixel_values", "image_sizes"):
        assert torch.equal(tensors[name], inputs[name]), f"the reloaded processor changed {name}"
    assert torch.equal(tensors["logits"], checkpoint["logits"])

    with torch.no_grad():
        last_hidden_state = checkpoint["model"].model(**inputs).last_hidden_state
    assert torch.equal(tensors["last_hidden_state"], last_hidden_state)


def test_pipeline_answers(checkpoint, remote):
    answer = remote["answer"]
    assert isinstance(answer, list) and len(answer) == 1
    assert isinstance(answer[0]["generated_text"], str)

    model, processor, inputs = checkpoint["model"], checkpoint["processor"], checkpoint["inputs"]
    generated = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    new_tokens = generated[0, inputs["input_ids"].shape[1] :]
    assert answer[0]["generated_text"] == processor.decode(new_tokens, skip_special_tokens=True)


def test_weights_a_checkpoint_lacks_are_initialised_as_in_a_fresh_model(tmp_path):
    """A checkpoint without the vision tower's weights: the tower gets SigLIP's own initialisation, as in a fresh model
    (Xavier-uniform attention and MLP weights, near-zero MLP biases), not the generic one."""
    model = VisionRememberForConditionalGeneration(tiny_config())
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file(
        {key: value for key, value in weights.items() if ".vision_tower." not in key},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    tower = VisionRememberForConditionalGeneration.from_pretrained(tmp_path).model.vision_tower
    for layer in tower.encoder.layers:
        width = layer.self_attn.q_proj.in_features
        assert layer.self_attn.q_proj.weight.abs().max() <= (6 / (2 * width)) ** 0.5  # Xavier-uniform's bound
        assert 0 < layer.mlp.fc1.bias.abs().max() < 1e-4
