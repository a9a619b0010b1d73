"""Grafting Vision Remember onto native Qwen2.5-VL, Qwen3-VL and MiniCPM-V 4.6 checkpoints, and stripping it off
again."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer, Qwen3VLForConditionalGeneration

from vr_hf.backbones import GRAFTS
from vr_hf.conversion import ConversionError, graft, strip_vision_remember
from vr_hf.conversion.grafting import CarriedFiles
from vr_hf.modeling.modeling_vision_remember_base import RememberImageOutputs
from vr_hf.modeling.vision_remember import concat_windows
from vr_hf.tiny import byte_tokenizer

from conftest import build_model, random_image
from tiny_grafts import (
    ANSWER,
    GRAFTED_CLASS,
    IMAGE,
    IMAGE_SIZES,
    PROMPT,
    QWEN,
    SETTINGS,
    coded_image,
    image_inputs,
    perturb,
    tensors,
    tiny_sources,
)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh interpreter with `vr_hf` blocked: every class must come from the folder's remote code.
REMOTE_SCRIPT = r"""
import json
import sys

sys.modules["vr_hf"] = None

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForImageTextToText

jobs = json.loads(sys.argv[1])
report = {}
for name, (folder, inputs_path, output_path) in jobs.items():
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(**load_file(inputs_path)).logits
    save_file({"logits": logits.contiguous()}, output_path)
    report[name] = {"config": type(config).__module__, "model": type(model).__module__, "class": type(model).__name__}
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("graft")
    sources = tiny_sources(root)
    grafted = {name: Path(graft(sources[name], root / f"{name}-vr", **SETTINGS)) for name in sources}
    stripped = {name: Path(strip_vision_remember(grafted[name], root / f"{name}-stripped")) for name in sources}
    inputs = {name: image_inputs(name, random_image(*IMAGE_SIZES[name][0])) for name in GRAFTS}
    return {"root": root, "sources": sources, "grafted": grafted, "stripped": stripped, "inputs": inputs}


def native_model(checkpoints, name):
    return AutoModelForImageTextToText.from_pretrained(checkpoints["sources"][name]).eval()


@pytest.fixture(scope="module")
def remote(checkpoints):
    """Logits of each grafted folder, loaded in a fresh process without `vr_hf`."""
    root, jobs = checkpoints["root"], {}
    for name, folder in checkpoints["grafted"].items():
        save_file(tensors(checkpoints["inputs"][name]), root / f"{name}-inputs.safetensors")
        jobs[name] = [str(folder), str(root / f"{name}-inputs.safetensors"), str(root / f"{name}-logits.safetensors")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(root / "modules"), TRANSFORMERS_VERBOSITY="error")
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    command = [sys.executable, "-I", "-c", REMOTE_SCRIPT, json.dumps(jobs)]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return {name: dict(report[name], logits=load_file(paths[2])["logits"]) for name, paths in jobs.items()}


@pytest.mark.parametrize("name", GRAFTS)
def test_graft_keeps_weights_and_adds_its_own(checkpoints, name):
    native = native_model(checkpoints, name).state_dict()
    grafted = GRAFTED_CLASS[name].from_pretrained(checkpoints["grafted"][name])
    state = grafted.state_dict()
    new = {key for key in state if key.startswith("model.vision_remember.")}
    assert new and set(state) - new == set(native)
    for key, tensor in native.items():
        assert torch.equal(state[key], tensor), key
    config = json.loads((checkpoints["grafted"][name] / "config.json").read_text())
    assert config["model_type"] == f"vision_remember_{name}" and config["remember_after_layers"] == [0, 2]
    assert config["auto_map"]["AutoModelForImageTextToText"].endswith("ForConditionalGeneration")
    card = (checkpoints["grafted"][name] / "README.md").read_text()
    assert "trust_remote_code=True" in card and "[0, 2]" in card
    assert (checkpoints["grafted"][name] / "tokenizer.json").is_file()
    shared = {"configuration_vision_remember_settings", "configuration_vision_remember_graft"}
    shared |= {"modeling_vision_remember_base", "conversation_turns", "vision_remember", "vision_remember_attention"}
    shared |= {"vision_remember_triton"}
    own = {f"configuration_vision_remember_{name}", f"modeling_vision_remember_{name}"}
    assert {path.stem for path in checkpoints["grafted"][name].glob("*.py")} == shared | own


@pytest.mark.parametrize("name", GRAFTS)
def test_remote_code_reproduces_original_logits(checkpoints, remote, name):
    assert remote[name]["config"].startswith("transformers_modules.")
    assert remote[name]["model"].startswith("transformers_modules.")
    assert remote[name]["class"] == GRAFTED_CLASS[name].__name__
    with torch.no_grad():
        expected = native_model(checkpoints, name)(**checkpoints["inputs"][name]).logits
    assert torch.equal(remote[name]["logits"], expected)


@pytest.mark.parametrize(
    ("name", "mode", "side"),
    [("qwen2_5_vl", None, 2), ("qwen3_vl", None, 2), ("minicpmv4_6", "16x", 4), ("minicpmv4_6", "4x", 2)],
)
def test_each_token_window_is_its_own_patch_block(checkpoints, name, mode, side):
    """Patch embeddings that are the patch's own (row, column): each token's window holds its block, row-major."""
    config = GRAFTED_CLASS[name].config_class.from_pretrained(checkpoints["grafted"][name], vision_feature_layers=[0])
    model = GRAFTED_CLASS[name](config).eval()
    rows, cols = 8, 12
    with torch.no_grad():
        if name in QWEN:
            visual = model.model.visual
            embed = visual.patch_embed.proj.weight  # (D, C, T, P, P)
            embed.zero_()
            embed[0, 0, 0, 0, 0] = embed[1, 1, 0, 0, 0] = 1
            if name == "qwen3_vl":  # its patch bias and learned positions
                visual.patch_embed.proj.bias.zero_()
                visual.pos_embed.weight.zero_()
            inputs = image_inputs(name, coded_image(rows, cols, 14), raw=True)
            image = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        else:
            embeddings = model.model.vision_tower.embeddings
            for parameter in (embeddings.patch_embedding.weight, embeddings.patch_embedding.bias):
                parameter.zero_()
            embeddings.position_embedding.weight.zero_()
            embeddings.patch_embedding.weight[0, 0, 0, 0] = embeddings.patch_embedding.weight[1, 1, 0, 0] = 1
            inputs = image_inputs(name, coded_image(rows, cols, 4), raw=True, mode=mode)
            image = model.model.get_image_features(
                inputs["pixel_values"], inputs["target_sizes"], downsample_mode=mode
            )
    (features,), (window_index,) = image.remember_features, image.window_index
    coordinates = features[:, :2][window_index].round().long()  # (tokens, side**2, 2)

    token_rows, token_cols = torch.meshgrid(torch.arange(rows // side), torch.arange(cols // side), indexing="ij")
    offset_rows, offset_cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    expected_rows = token_rows.reshape(-1, 1) * side + offset_rows.reshape(1, -1)
    expected_cols = token_cols.reshape(-1, 1) * side + offset_cols.reshape(1, -1)
    assert len(image.pooler_output[0]) == (rows // side) * (cols // side) == len(coordinates)
    assert torch.equal(coordinates, torch.stack([expected_rows, expected_cols], dim=-1))


@pytest.mark.parametrize("name", GRAFTS)
def test_global_interaction_attends_to_the_whole_image(checkpoints, name):
    config = GRAFTED_CLASS[name].config_class.from_pretrained(checkpoints["grafted"][name], interaction="global")
    model = GRAFTED_CLASS[name](config).eval()
    inputs = checkpoints["inputs"][name]
    contexts = []
    prepare = model.model.vision_remember.prepare
    model.model.vision_remember.prepare = lambda *args, **kwargs: (
        contexts.append(prepare(*args, **kwargs)) or contexts[-1]
    )
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        del model.model.vision_remember.prepare
    (context,) = contexts
    image_tokens = int((inputs["input_ids"] == config.image_token_id).sum())
    assert context.tokens_per_image == [image_tokens] and context.window_features is None
    assert (
        context.features_per_image
        == [len(context.image_features)]
        == [image_tokens * (16 if name == "minicpmv4_6" else 4)]
    )


@pytest.mark.parametrize("name", GRAFTS)
def test_training_step_changes_output(checkpoints, name):
    model = GRAFTED_CLASS[name].from_pretrained(checkpoints["grafted"][name])
    inputs = checkpoints["inputs"][name]
    labels = torch.where(inputs["input_ids"] == IMAGE, -100, inputs["input_ids"])
    with torch.no_grad():
        before = model.eval()(**inputs).logits
    optimizer = torch.optim.Adam(model.model.vision_remember.parameters(), lr=1e-2)
    model.train()(**inputs, labels=labels).loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = model.eval()(**inputs).logits
    assert not torch.allclose(before, after)
    prompt = len(PROMPT)  # text before the image sees no vision token
    assert torch.equal(before[:, :prompt], after[:, :prompt])


@pytest.mark.parametrize("name", GRAFTS)
def test_sft_trainer_step(checkpoints, name, tmp_path):
    """TRL's SFTTrainer trains the grafted model: its fused-head loss is the model's own loss on the answer, the step
    reaches Vision Remember, and the base stays as trained (here: frozen). Batches come from a collator that lays the
    inputs out as the stock processor does (that processor needs torchvision, which this environment lacks)."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    model = GRAFTED_CLASS[name].from_pretrained(checkpoints["grafted"][name])
    perturb(model)  # Vision Remember active, so a loss computed without the answer mask would differ
    model.requires_grad_(False)
    model.model.vision_remember.requires_grad_(True)
    inputs = checkpoints["inputs"][name]
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -len(ANSWER) :] = inputs["input_ids"][:, -len(ANSWER) :]
    batch = {**inputs, "labels": labels}
    with torch.no_grad():
        expected_loss = model.eval()(**batch).loss.item()
    base_before = {key: value.clone() for key, value in model.model.language_model.state_dict().items()}
    remember_before = [parameter.detach().clone() for parameter in model.model.vision_remember.parameters()]

    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=1,
        learning_rate=1e-2,
        bf16=False,  # SFTConfig's default autocasts to bf16, even on CPU: compare float32 with float32
        max_length=None,
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    dataset = datasets.Dataset.from_list([{"input_ids": inputs["input_ids"][0].tolist()}])
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, data_collator=lambda rows: dict(batch))
    guidance = []
    prepare = model.model.vision_remember.prepare

    def spy_prepare(layout, *args):
        guidance.append(~layout.unguided[..., 0])
        return prepare(layout, *args)

    model.model.vision_remember.prepare = spy_prepare
    try:
        trainer.train()
    finally:
        del model.model.vision_remember.prepare

    assert len(guidance) == 1 and not guidance[0][:, -len(ANSWER) :].any(), "the answer fed the text-guided token"
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == [pytest.approx(expected_loss, rel=1e-6)]
    after = list(model.model.vision_remember.parameters())
    assert any(not torch.equal(old, new) for old, new in zip(remember_before, after))
    assert all(torch.equal(base_before[key], value) for key, value in model.model.language_model.state_dict().items())


@pytest.mark.parametrize("name", GRAFTS)
def test_strip_gives_back_the_original(checkpoints, name):
    folder = checkpoints["stripped"][name]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == name and "auto_map" not in config and "remember_after_layers" not in config
    assert not list(folder.glob("*.py"))
    stripped = AutoModelForImageTextToText.from_pretrained(folder).eval()
    native = native_model(checkpoints, name)
    assert type(stripped) is type(native)
    assert stripped.state_dict().keys() == native.state_dict().keys()
    inputs = checkpoints["inputs"][name]
    with torch.no_grad():
        assert torch.equal(stripped(**inputs).logits, native(**inputs).logits)


def prompt_only(inputs: dict) -> tuple[dict, int]:
    """The inputs without their answer, and the prompt's length."""
    prompt_length = inputs["input_ids"].shape[1] - len(ANSWER)
    per_token = ("input_ids", "attention_mask", "mm_token_type_ids")
    prompt = {key: value[:, :prompt_length] if key in per_token else value for key, value in inputs.items()}
    return prompt, prompt_length


@pytest.mark.parametrize("name", GRAFTS)
def test_generation_after_grafting(checkpoints, name):
    inputs, prompt_length = prompt_only(checkpoints["inputs"][name])
    native = native_model(checkpoints, name)
    model = GRAFTED_CLASS[name].from_pretrained(checkpoints["grafted"][name]).eval()
    for search in (dict(do_sample=False), dict(num_beams=2, num_return_sequences=2)):
        expected = native.generate(**inputs, max_new_tokens=4, **search)
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, **search), expected)

    perturb(model)  # Vision Remember active: generate's prefill must run it, as a plain forward does
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1]
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == prompt_length + 4 and torch.equal(generated[:, prompt_length], logits.argmax(-1))
    # Beam search expands the inputs per beam; its first step keeps the two most likely tokens of the same prefill.
    beams = model.generate(**inputs, max_new_tokens=1, num_beams=2, num_return_sequences=2)
    assert torch.equal(beams[:, prompt_length], logits.topk(2).indices.flatten())
    with pytest.raises(ValueError, match="cannot generate with prefill_chunk_size"):
        model.generate(**inputs, max_new_tokens=1, prefill_chunk_size=4)


def test_deepstack_off_runs_qwen3_vl_as_if_it_had_none(checkpoints):
    """`deepstack=False`: the logits and greedy generation of a native Qwen3-VL whose encoder feeds no DeepStack
    layers, on the same weights; beam search too (which the native model cannot run without DeepStack layers). With
    DeepStack on, the logits are the source's, and differ."""
    inputs, prompt_length = prompt_only(checkpoints["inputs"]["qwen3_vl"])
    model = GRAFTED_CLASS["qwen3_vl"].from_pretrained(checkpoints["grafted"]["qwen3_vl"], deepstack=False).eval()
    native = native_model(checkpoints, "qwen3_vl")
    assert native.config.vision_config.deepstack_visual_indexes
    config = AutoConfig.from_pretrained(checkpoints["sources"]["qwen3_vl"])
    config.vision_config.deepstack_visual_indexes = []
    without = Qwen3VLForConditionalGeneration(config).eval()
    missing, unexpected = without.load_state_dict(native.state_dict(), strict=False)
    assert not missing and unexpected and all(".deepstack_merger_list." in key for key in unexpected)
    with torch.no_grad():
        logits = model(**inputs).logits
        assert torch.equal(logits, without(**inputs).logits)
        assert not torch.allclose(logits, native(**inputs).logits)
    greedy = dict(max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(**inputs, **greedy), without.generate(**inputs, **greedy))
    beams = model.generate(**inputs, max_new_tokens=1, num_beams=2, num_return_sequences=2)
    assert torch.equal(beams[:, prompt_length], logits[:, -1].topk(2).indices.flatten())


def test_beam_search_keeps_each_sample_with_its_own_image(checkpoints):
    """Generation encodes the images once, then regroups them per beam: each sample's beams must read its own."""
    name = "qwen2_5_vl"
    samples = [image_inputs(name, image) for image in (random_image(56, 84), coded_image(4, 6, 14))]
    inputs = {key: torch.cat([sample[key] for sample in samples]) for key in samples[0]}
    prompt_length = inputs["input_ids"].shape[1] - len(ANSWER)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        inputs[key] = inputs[key][:, :prompt_length]
    model = GRAFTED_CLASS[name].from_pretrained(checkpoints["grafted"][name]).eval()
    perturb(model)
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1]
    assert not torch.equal(logits[0], logits[1])
    beams = model.generate(**inputs, max_new_tokens=1, num_beams=3, num_return_sequences=3)
    assert torch.equal(beams[:, prompt_length], logits.topk(3).indices.flatten())


def test_image_outputs_regroup_per_image_and_windows_concatenate():
    """Per-image features and windows (as `get_image_features` returns them) follow their images when generation
    regroups them, and concatenate into one table with shifted rows."""
    features = (torch.zeros(4, 2), torch.ones(3, 2))
    windows = (torch.tensor([[0, 1], [2, 3]]), torch.tensor([[0, 1, 2]]))
    pooled = [torch.zeros(2), torch.zeros(1)]
    image = RememberImageOutputs(pooler_output=pooled, remember_features=features, window_index=windows)
    assert torch.equal(concat_windows(list(windows), [4, 3]), torch.tensor([[0, 1, -1], [2, 3, -1], [4, 5, 6]]))
    image.select_images([1, 0, 1])
    assert [len(tokens) for tokens in image.pooler_output] == [1, 2, 1]
    counts = [len(rows) for rows in image.remember_features]
    expected = torch.tensor([[0, 1, 2], [3, 4, -1], [5, 6, -1], [7, 8, 9]])
    assert torch.equal(concat_windows(list(image.window_index), counts), expected)


def test_bad_input_raises_and_writes_nothing(checkpoints, tmp_path, monkeypatch):
    sources, grafted, out = checkpoints["sources"], checkpoints["grafted"], tmp_path / "out"
    llava = tmp_path / "llava-vr"
    build_model().save_pretrained(llava)
    with pytest.raises(
        ConversionError, match="is a 'vision_remember' checkpoint: Vision Remember grafts onto Qwen2.5-VL"
    ):
        graft(llava, out, **SETTINGS)
    with pytest.raises(ConversionError, match="remember_after_layers has index 3"):
        graft(sources["qwen2_5_vl"], out, remember_after_layers=[0, 3], cross_attention_heads=4)
    with pytest.raises(ConversionError, match="vision_feature_layers has index 3"):
        graft(sources["minicpmv4_6"], out, vision_feature_layers=[3], **SETTINGS)
    with pytest.raises(ConversionError, match="already has Vision Remember"):
        graft(grafted["minicpmv4_6"], out, **SETTINGS)
    with pytest.raises(ConversionError, match="Unknown Vision Remember settings"):
        graft(sources["qwen2_5_vl"], out, remember_after_layer=[0])
    with pytest.raises(ConversionError, match="Unknown Vision Remember settings \\['deepstack'\\]"):
        graft(sources["qwen2_5_vl"], out, deepstack=False)  # Qwen3-VL's own setting
    with pytest.raises(ConversionError, match="no Vision Remember to strip"):
        strip_vision_remember(sources["qwen2_5_vl"], out)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        graft(tmp_path / "missing", out)

    def fail(self, output_dir):
        raise OSError("disk full")

    monkeypatch.setattr(CarriedFiles, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        graft(sources["qwen2_5_vl"], out, **SETTINGS)
    assert os.listdir(tmp_path) == ["llava-vr"]


def test_cli(checkpoints, tmp_path, capsys):
    for script in ("graft.py", "strip_vision_remember.py"):
        main = runpy.run_path(os.path.join(ROOT, "conversion", script))["main"]
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        help_text = capsys.readouterr().out
        assert exit_info.value.code == 0 and "example" in help_text and "--output-dir" in help_text

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    arguments = ["--source", str(checkpoints["sources"]["qwen2_5_vl"]), "--output-dir", str(tmp_path / "vr")]
    arguments += ["--remember-after-layers", "1", "--cross-attention-heads", "4", "--no-bidirectional"]
    script = os.path.join(ROOT, "conversion", "graft.py")
    run = subprocess.run([sys.executable, script, *arguments], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    config = json.loads((tmp_path / "vr" / "config.json").read_text())
    assert config["remember_after_layers"] == [1] and config["bidirectional"] is False

    main = runpy.run_path(script)["main"]
    assert main(arguments) == 1 and "not empty" in capsys.readouterr().err


@pytest.mark.parametrize("name", GRAFTS)
def test_a_grafted_checkpoint_pads_prompts_on_the_left(tmp_path, name):
    """Whatever side the source's tokenizer padded on, a grafted checkpoint's pads on the left, as generation needs."""
    source = tiny_sources(tmp_path)[name]
    right = byte_tokenizer()
    right.padding_side = "right"
    right.save_pretrained(source)
    folder = graft(source, tmp_path / f"{name}-vr", **SETTINGS)
    assert AutoTokenizer.from_pretrained(folder).padding_side == "left"
