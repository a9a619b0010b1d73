"""The recipes' command line is TRL's (`TrlParser` over `SFTConfig`) with the paper's settings as defaults, checked
before anything loads; their outputs carry a model card that says what they are and how to load them."""

import dataclasses
import re

import pytest
import yaml
from PIL import Image
from test_resume import load_recipe, recipe_argv, write_rows
from transformers.utils import is_torchvision_available

from vr_hf.backbones import GRAFTS
from vr_hf.recipes import load_model_and_processor, recipe_model_card
from vr_hf.tiny import byte_tokenizer, tiny_config

from conftest import random_image
from tiny_grafts import grafted_checkpoint


@pytest.fixture(scope="module")
def instruction():
    return load_recipe("train_instruction")


@pytest.fixture(scope="module")
def alignment():
    return load_recipe("train_alignment")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("data"), count=4)


def test_defaults_are_the_papers(instruction, alignment):
    recipe, lora, args = instruction.parse_args(["--tiny", "--data", "rows.json"])
    assert (args.learning_rate, recipe.global_batch_size, args.per_device_train_batch_size) == (2e-4, 32, 4)
    assert args.gradient_accumulation_steps == 8  # 32 = 1 process x 4 per device x 8
    assert args.lr_scheduler_type.value == "cosine" and args.num_train_epochs == 1 and args.weight_decay == 0
    assert args.assistant_only_loss and args.activation_checkpointing and args.max_length is None
    assert not lora.lora and lora.lora_rank == 16

    recipe, args = alignment.parse_args(["--tiny", "--data", "rows.json"])
    assert (args.learning_rate, recipe.global_batch_size, args.gradient_accumulation_steps) == (1e-3, 256, 16)
    assert recipe.learning_rates("alignment", args.learning_rate) == {"projector": 1e-3, "vision_remember": 1e-3}


def test_the_documented_flags_parse_without_warnings(instruction, recwarn):
    """QLoRA as the docs and the error message write it, and the recipes' own defaults, which set no deprecated
    Transformers argument on the user's behalf."""
    qlora = ["--qlora", "--bf16", "true", "--use_cpu"]
    _, lora, args = instruction.parse_args(["--model", "someone/llava-vr", "--data", "rows.json", *qlora])
    assert lora.qlora and args.bf16 and args.activation_checkpointing
    assert not [warning for warning in recwarn if issubclass(warning.category, FutureWarning)]


def test_every_sft_config_flag_works_and_overrides_the_defaults(instruction, tmp_path):
    argv = ["--tiny", "--data", "rows.json", "--learning_rate", "1e-5", "--lr_scheduler_type", "linear"]
    argv += ["--no_gradient_checkpointing", "--report_to", "tensorboard", "--dataset_num_proc", "2"]
    argv += ["--push_to_hub", "--hub_model_id", "someone/llava-vr", "--max_length", "2048", "--seed", "7"]
    argv += ["--global_batch_size", "0", "--gradient_accumulation_steps", "3"]
    argv += ["--part_learning_rates", "vision_remember=3e-4", "vision_tower=1e-6", "--lora", "--lora_rank", "8"]
    recipe, lora, args = instruction.parse_args(argv)
    assert (args.learning_rate, args.lr_scheduler_type.value, args.activation_checkpointing) == (1e-5, "linear", False)
    assert (args.report_to, args.dataset_num_proc, args.push_to_hub) == (["tensorboard"], 2, True)
    assert (args.hub_model_id, args.max_length, args.seed, args.gradient_accumulation_steps) == (
        "someone/llava-vr",
        2048,
        7,
        3,
    )
    assert recipe.learning_rates("instruction", args.learning_rate) == {
        "projector": 1e-5,
        "vision_remember": 3e-4,
        "language_model": 1e-5,
        "lm_head": 1e-5,
        "vision_tower": 1e-6,
    }
    assert lora.lora and lora.lora_rank == 8

    config = tmp_path / "recipe.yaml"  # TRL's --config file, command-line flags on top
    config.write_text(yaml.safe_dump({"learning_rate": 5e-5, "warmup_steps": 10, "tiny": True, "data": "rows.json"}))
    _, _, args = instruction.parse_args(["--config", str(config), "--warmup_steps", "20"])
    assert (args.learning_rate, args.warmup_steps) == (5e-5, 20)


@pytest.mark.parametrize(
    "argv, error",
    [
        ([], "Give the model to train"),
        (["--tiny", "--model", "llava-vr"], "Give the model to train"),
        (["--tiny", "--gradient_accumulation_steps", "4"], "both set the batch: give one"),
        (["--tiny", "--global_batch_size", "30"], "not a whole number of steps of 4 samples"),
        (["--tiny", "--eval_strategy", "steps"], "a LLaVA JSON file has no splits: give --eval_data"),
        (["--tiny", "--part_learning_rates", "projecter=1e-3"], "the part must be one of"),
        (["--tiny", "--part_learning_rates", "projector"], "write PART=LR"),
        (["--tiny", "--qlora"], "--qlora quantizes a checkpoint as it loads: give it with --model"),
        (["--model", "someone/llava-vr", "--qlora", "--bf16", "false"], "QLoRA's adapters in bf16): add --bf16 true"),
        (["--model", "someone/llava-vr", "--qlora", "--merge"], "merge a QLoRA adapter into the full-precision model"),
        (["--tiny", "--merge"], "--merge merges LoRA adapters: add --lora"),
        (["--tiny", "--resume_from_checkpoint", "latest"], "there is no checkpoint in"),
        (["--model", "llava-vr-algned"], "--model 'llava-vr-algned': no such folder"),
        (["--model", "./outputs/llava-vr"], "--model './outputs/llava-vr': no such folder"),
    ],
)
def test_mistakes_are_refused_before_anything_loads(instruction, argv, error, capsys, tmp_path):
    """As command-line errors: usage and the message, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        instruction.parse_args(["--data", "rows.json", "--output_dir", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2
    assert error in capsys.readouterr().err


def test_evaluation_on_held_out_rows(instruction, data, tmp_path):
    held_out = write_rows(tmp_path / "held_out", count=2)
    argv = recipe_argv(data, tmp_path / "output", "--max_steps", "2", "--eval_strategy", "steps", "--eval_steps", "1")
    argv += ["--eval_data", str(held_out), "--per_device_eval_batch_size", "2"]
    trainer = instruction.build_trainer(*instruction.parse_args(argv))
    trainer.train()
    assert len(trainer.eval_dataset) == 2
    assert [entry["step"] for entry in trainer.state.log_history if "eval_loss" in entry] == [1, 2]


@pytest.fixture(scope="module")
def trained(alignment, data, tmp_path_factory):
    """A finished alignment run on the tiny model: its output folder and its trainer."""
    output_dir = tmp_path_factory.mktemp("run") / "llava-vr-aligned"
    trainer = alignment.main(recipe_argv(data, output_dir, "--max_steps", "2"))
    return output_dir, trainer


def card_metadata(text: str) -> dict:
    return yaml.safe_load(text.split("---")[1])


def test_model_card_says_what_was_trained_and_how_to_load_it(trained, data):
    output_dir, _ = trained
    card = (output_dir / "README.md").read_text()
    metadata = card_metadata(card)
    assert metadata["pipeline_tag"] == "image-text-to-text" and metadata["library_name"] == "transformers"
    assert "base_model" not in metadata and "datasets" not in metadata  # local paths are not Hub repos
    assert "fine-tuned version of" not in card and "[None]" not in card and "text-generation" not in card
    assert "# llava-vr-aligned" in card and "tiny random LLaVA-VR" in card and f"`{data}` (4 samples)" in card
    assert "Phase 1 (alignment): trained projector" in card and "vision_remember" in card
    assert f'pipeline("image-text-to-text", model="{output_dir}", trust_remote_code=True)' in card


def test_model_card_snippet_runs(trained, monkeypatch):
    """The card's usage code, run as written (on a local image), loads the output with remote code and answers."""
    output_dir, _ = trained
    snippet = re.search(r"```python\n(.*?)```", (output_dir / "README.md").read_text(), re.S).group(1)
    monkeypatch.chdir(output_dir.parent)
    random_image(40, 60, seed=5).save("photo.jpg")
    snippet = snippet.replace("max_new_tokens=64", "max_new_tokens=3")
    namespace = {}
    exec(snippet, namespace)
    assert isinstance(namespace["pipe"].model.config.model_type, str)
    assert type(namespace["pipe"].model).__module__.startswith(("transformers_modules.", "vr_hf."))
    assert isinstance(Image.open("photo.jpg"), Image.Image)


def test_model_card_names_hub_base_model_and_data(trained):
    _, trainer = trained
    hub = dict(tiny=False, model="someone/llava-vr-init", data="someone/caps")
    trainer.recipe = dataclasses.replace(trainer.recipe, **hub)
    card = str(recipe_model_card(trainer, "llava-vr-aligned", "someone/llava-vr-aligned", adapter=True))
    metadata = card_metadata(card)
    assert metadata["base_model"] == "someone/llava-vr-init" and metadata["datasets"] == ["someone/caps"]
    assert metadata["library_name"] == "peft"
    assert 'AutoModelForImageTextToText.from_pretrained("someone/llava-vr-init", trust_remote_code=True)' in card
    assert 'PeftModel.from_pretrained(model, "someone/llava-vr-aligned")' in card


def test_qlora_recipe_trains_on_the_cpu(instruction, data, tmp_path):
    """`--qlora` loads the checkpoint's decoder in 4-bit NF4 and trains adapters (bitsandbytes and bf16 on the CPU)."""
    bnb = pytest.importorskip("bitsandbytes")
    from vr_hf.recipes import tiny_model_and_processor

    model, processor = tiny_model_and_processor()
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    qlora = ["--qlora", "--lora_rank", "4", "--bf16", "true", "--use_cpu", "--warmup_steps", "0"]
    argv = recipe_argv(data, tmp_path / "qlora", "--max_steps", "1", *qlora)
    argv[argv.index("--tiny")] = "--model"
    argv.insert(argv.index("--model") + 1, str(tmp_path / "base"))
    trainer = instruction.main(argv)

    base = trainer.model.get_base_model()
    assert isinstance(base.model.language_model.layers[0].mlp.up_proj.base_layer, bnb.nn.Linear4bit)
    assert any("lora_B" in name and p.abs().max() > 0 for name, p in trainer.model.named_parameters())
    assert (tmp_path / "qlora" / "adapter_model.safetensors").is_file()
    assert card_metadata((tmp_path / "qlora" / "README.md").read_text())["library_name"] == "peft"


def test_a_checkpoint_without_its_image_processor_is_refused_before_it_loads(tmp_path):
    """A checkpoint saved with its tokenizer but not its image processor."""
    tiny_config().save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(OSError, match="Can't load image processor .* preprocessor_config.json"):
        load_model_and_processor(tmp_path)


@pytest.mark.parametrize("name", GRAFTS)
def test_a_grafted_checkpoint_loads_for_the_recipes_without_torchvision(tmp_path, name):
    """The recipes load processors the one way vr-hf does, which stands in for the video part torchvision would run."""
    model, processor = load_model_and_processor(grafted_checkpoint(tmp_path, name))
    assert type(model).__name__.startswith("VisionRemember") and processor.image_processor is not None
    if not is_torchvision_available():
        with pytest.raises(RuntimeError, match="Video inputs need torchvision"):
            processor.video_processor(videos=[])
