"""LoRA with PEFT: adapters on the decoder's projections only, projector and Vision Remember fully trained, and a
merged checkpoint that a fresh process (without `vr_hf`) reloads with identical logits."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from operator import attrgetter

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

from vr_hf.backbones import BACKBONES, GRAFTS
from vr_hf.conversion import graft
from vr_hf.lora import (
    DECODER_PROJECTIONS,
    fully_trained_paths,
    lora_config,
    lora_summary,
    qlora_quantization_config,
    save_merged,
)
from vr_hf.processor import build_processor
from vr_hf.tiny import byte_tokenizer

from conftest import active_model, conversation, random_image
from tiny_grafts import GRAFTED_CLASS, SETTINGS, tiny_sources


datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

PROJECTIONS = [f"self_attn.{name}_proj" for name in "qkvo"] + [f"mlp.{name}_proj" for name in ("gate", "up", "down")]

# Runs in a fresh interpreter in which `import vr_hf` fails: the model class comes from the folder's remote code.
RELOAD_SCRIPT = r"""
import json
import sys

sys.modules["vr_hf"] = None

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText
from transformers import AutoModelForImageTextToText

folder, inputs_path, output = sys.argv[1:]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(**load_file(inputs_path)).logits
save_file({"logits": logits.contiguous()}, output)
print(json.dumps({"module": type(model).__module__}))
"""


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """One LoRA SFTTrainer step on a tiny model whose Vision Remember blocks matter, then the batch it trained on."""
    model = active_model()
    processor = build_processor(model.config, byte_tokenizer())
    rows = [
        {"images": [random_image(40, 90, seed=1)], "messages": conversation("What is it?", "Noise, mostly.")},
        {"images": [random_image(80, 30, seed=2)], "messages": conversation("Colour?", "Grey.")},
    ]
    dataset = datasets.Dataset.from_list(rows)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = trl.SFTConfig(
        output_dir=str(tmp_path_factory.mktemp("lora")),
        assistant_only_loss=True,
        max_steps=1,
        per_device_train_batch_size=2,
        max_length=None,
        learning_rate=1e-2,
        bf16=False,  # on a CPU, TRL's default is bf16 autocast: fp32 keeps the comparisons exact
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=lora_config(model, rank=4),
    )
    trainer.train()
    batch = trainer.data_collator([dict(row) for row in dataset])
    batch.pop("labels")
    return {"trainer": trainer, "processor": processor, "batch": batch, "before": before}


def test_adapters_hit_decoder_projections_only(lora_run):
    model = lora_run["trainer"].model
    adapted = {
        name.removeprefix("base_model.model.") for name, module in model.named_modules() if hasattr(module, "lora_A")
    }
    num_layers = model.config.text_config.num_hidden_layers
    expected = {
        f"model.language_model.layers.{i}.{projection}" for i in range(num_layers) for projection in PROJECTIONS
    }
    assert adapted == expected
    assert all(re.fullmatch(DECODER_PROJECTIONS, name) for name in adapted)
    # The vision tower and the Vision Remember blocks have q/k/v projections too: none may match
    others = [name for name, _ in model.base_model.model.named_modules() if "language_model" not in name]
    assert [name for name in others if name.endswith("_proj")], "the check below needs such projections"
    assert not [name for name in others if re.fullmatch(DECODER_PROJECTIONS, name)]


def test_projector_and_vision_remember_train_in_full(lora_run):
    model = lora_run["trainer"].model
    saved = {
        name.removeprefix("base_model.model.")
        for name, module in model.named_modules()
        if isinstance(module, peft.utils.ModulesToSaveWrapper)
    }
    assert saved == {"model.multi_modal_projector", "model.vision_remember"}

    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert all(".lora_" in name or ".modules_to_save.default." in name for name in trainable)
    for part in ("multi_modal_projector", "vision_remember"):
        copies = [name for name in trainable if f"{part}.modules_to_save" in name]
        parameters = [p for name, p in lora_run["before"].items() if name.startswith(f"model.{part}.")]
        assert len(copies) == len(parameters), f"not every parameter of {part} trains"


def test_qlora_quantizes_the_decoder_only(tmp_path):
    """bitsandbytes' NF4 on the CPU: every linear layer of the decoder becomes 4-bit, nothing else does."""
    bnb = pytest.importorskip("bitsandbytes")
    model = active_model()
    model.save_pretrained(tmp_path)
    linear = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    decoder = {name for name in linear if name.startswith("model.language_model.")}
    assert decoder and linear - decoder, "the check needs linear layers inside and outside the decoder"

    quantized_model = AutoModelForImageTextToText.from_pretrained(
        tmp_path, quantization_config=qlora_quantization_config(torch.float32)
    )
    quantized = {name for name, module in quantized_model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    assert quantized == decoder
    assert quantized_model.model.language_model.layers[0].mlp.up_proj.weight.quant_type == "nf4"
    full_precision = dict(quantized_model.named_parameters())
    for name, parameter in model.named_parameters():
        if not name.startswith("model.language_model."):
            assert torch.equal(full_precision[name], parameter), f"{name} changed"


def test_qlora_without_bitsandbytes_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="QLoRA needs bitsandbytes: pip install"):
        qlora_quantization_config()


@pytest.fixture(scope="module")
def merged(lora_run, tmp_path_factory):
    """The adapted model's logits, then the merged model, saved, and its logits."""
    model, batch = lora_run["trainer"].model.eval(), lora_run["batch"]
    with torch.no_grad():
        adapted_logits = model.base_model(**batch).logits
        lora_b = [p.detach().abs().max() for name, p in model.named_parameters() if "lora_B" in name]
    folder = tmp_path_factory.mktemp("merged")
    merged_model = save_merged(model, lora_run["processor"], folder).eval()
    with torch.no_grad():
        logits = merged_model(**batch).logits
    return {"folder": folder, "model": merged_model, "logits": logits, "adapted": adapted_logits, "lora_b": lora_b}


def test_merge_keeps_the_adapted_outputs(merged):
    assert max(merged["lora_b"]) > 0, "the adapters did not train: merging them would prove nothing"
    assert type(merged["model"]).__name__ == "VisionRememberForConditionalGeneration"
    assert not any("lora_" in name or "modules_to_save" in name for name in merged["model"].state_dict())
    torch.testing.assert_close(merged["logits"], merged["adapted"], rtol=1e-5, atol=1e-5)


def test_merged_checkpoint_reloads_identically_in_fresh_process(lora_run, merged, tmp_path):
    folder = merged["folder"]
    assert json.loads((folder / "config.json").read_text())["auto_map"]
    assert (folder / "processor_config.json").is_file()
    inputs_path, output, script = tmp_path / "inputs.safetensors", tmp_path / "logits.safetensors", tmp_path / "r.py"
    save_file({name: tensor.contiguous() for name, tensor in lora_run["batch"].items()}, inputs_path)
    script.write_text(RELOAD_SCRIPT)
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        TRANSFORMERS_VERBOSITY="error",
        OMP_NUM_THREADS=str(torch.get_num_threads()),  # the same reduction order as this process: bitwise-equal logits
    )
    command = [sys.executable, "-I", str(script), str(folder), str(inputs_path), str(output)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"reloading the merged checkpoint failed:\n{result.stderr[-4000:]}"
    assert json.loads(result.stdout.strip().splitlines()[-1])["module"].startswith("transformers_modules.")
    assert torch.equal(load_file(output)["logits"], merged["logits"])


@pytest.fixture(scope="module")
def grafts(tmp_path_factory):
    root = tmp_path_factory.mktemp("grafts")
    sources = tiny_sources(root)
    folders = {name: graft(sources[name], root / f"{name}-vr", **SETTINGS) for name in GRAFTS}
    return {name: GRAFTED_CLASS[name].from_pretrained(folder) for name, folder in folders.items()}


@pytest.mark.parametrize("name", list(BACKBONES))
def test_what_trains_under_lora_is_what_the_summary_says(grafts, name):
    """Every backbone's projector and Vision Remember train in full (a bare parameter stays frozen, and the summary
    says so), the decoder through adapters, nothing else."""
    model = active_model() if name == "llava_vr" else grafts[name]
    config = lora_config(model, rank=2)
    summary = lora_summary(model, config)
    in_full, frozen = fully_trained_paths(model)
    sizes = {path: len(list(attrgetter(path)(model).parameters())) for path in in_full}
    adapted = peft.get_peft_model(model, config)
    trainable = {name.removeprefix("base_model.model.") for name, p in adapted.named_parameters() if p.requires_grad}
    assert in_full and all(path in summary for path in in_full + frozen)
    for path, size in sizes.items():
        copies = {n for n in trainable if n.startswith(f"{path}.modules_to_save.default.")}
        assert len(copies) == size, f"{path} does not train in full"
    assert all(".lora_" in n or ".modules_to_save.default." in n for n in trainable)
    assert not any(n.startswith(path) for path in frozen for n in trainable)
    projector = {"llava_vr": "model.multi_modal_projector", "minicpmv4_6": "model.merger"}
    assert projector.get(name, "model.visual.merger") in in_full
    assert ("model.visual.deepstack_merger_list.1" in in_full) == (name == "qwen3_vl")
    assert ("model.image_newline" in frozen) == (name == "llava_vr")
