"""What the training recipes in `examples/` share: their command line, data, model, trainer and model card.

A recipe's command line is TRL's own, `trl.TrlParser` over `SFTConfig` (so every `SFTConfig` and `TrainingArguments`
flag works: `--report_to`, `--eval_strategy`, `--push_to_hub`, `--dataset_num_proc`, `--config recipe.yaml`...), plus
`RecipeArguments` for what is Vision Remember's own: the model, the data, the global batch and each part's learning
rate. Each recipe sets the paper's settings as defaults that the flags override (`recipe_parser`).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from huggingface_hub import ModelCard, ModelCardData
from trl import SFTConfig, SFTTrainer, TrlParser

from .checkpoints import resolve_source
from .training import PARTS, PHASES


# Every recipe's defaults, where they differ from `SFTConfig`'s. TRL's already match the paper's: gradient
# checkpointing on, no weight decay.
RECIPE_DEFAULTS = dict(
    num_train_epochs=1,
    lr_scheduler_type="cosine",
    warmup_steps=0.03,  # a fraction of the steps
    max_length=None,  # truncating a sample can cut through its image tokens
    assistant_only_loss=True,
    bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),  # TRL's default bf16 refuses a CPU
    # Every parameter is used on every step, batches without images included (the model runs its vision path on a
    # stand-in image, with zero weight): DDP needs no search for unused ones.
    ddp_find_unused_parameters=False,
)


@dataclass
class RecipeArguments:
    """The model, the data, the global batch and per-part learning rates: what a recipe adds to `SFTConfig`."""

    data: str = field(
        metadata={
            "help": "Training data: a LLaVA .json/.jsonl, a save_to_disk folder, or a Hub dataset with "
            "`images` and `messages` columns."
        }
    )
    model: str | None = field(
        default=None, metadata={"help": "Checkpoint folder or Hub id to train, loaded with vr-hf's own classes."}
    )
    tiny: bool = field(
        default=False, metadata={"help": "Train a tiny random model instead, to try a recipe on a CPU in seconds."}
    )
    image_folder: str | None = field(
        default=None,
        metadata={"help": "Folder the LLaVA rows' image paths are relative to (default: the JSON file's folder)."},
    )
    train_split: str = field(default="train", metadata={"help": "Split of a saved DatasetDict or Hub dataset."})
    eval_data: str | None = field(
        default=None,
        metadata={"help": "Evaluation data, as --data (with --eval_strategy). Default: --eval_split of --data."},
    )
    eval_split: str = field(default="test", metadata={"help": "Evaluation split of a DatasetDict or Hub dataset."})
    global_batch_size: int = field(
        default=0,
        metadata={
            "help": "Samples per optimizer step over all processes: sets --gradient_accumulation_steps. "
            "0 leaves --gradient_accumulation_steps as given."
        },
    )
    part_learning_rates: list[str] = field(
        default_factory=list,
        metadata={
            "help": f"PART=LR: train a part at its own rate (parts: {', '.join(PARTS)}), e.g. "
            "vision_remember=2e-3. The other trained parts train at --learning_rate."
        },
    )

    def __post_init__(self):
        if bool(self.model) == self.tiny:
            raise ValueError("Give the model to train: --model CHECKPOINT (a folder or Hub id), or --tiny.")
        self.part_rates()  # a bad PART=LR fails here, before anything loads

    def part_rates(self) -> dict[str, float]:
        """`--part_learning_rates` as `{part: rate}`."""
        rates = {}
        for setting in self.part_learning_rates:
            part, _, rate = setting.partition("=")
            if part not in PARTS:
                raise ValueError(f"--part_learning_rates {setting!r}: the part must be one of {', '.join(PARTS)}.")
            try:
                rates[part] = float(rate)
            except ValueError:
                raise ValueError(
                    f"--part_learning_rates {setting!r}: write PART=LR, e.g. vision_remember=2e-3."
                ) from None
        return rates

    def learning_rates(self, phase: str, learning_rate: float) -> dict[str, float]:
        """The phase's parts at `learning_rate`, with `--part_learning_rates` on top (which may add parts)."""
        return {**dict.fromkeys(PHASES[phase], learning_rate), **self.part_rates()}


@dataclass
class LoraArguments:
    """LoRA and QLoRA on the decoder (`vr_hf.lora`)."""

    lora: bool = field(
        default=False,
        metadata={"help": "Train the decoder through LoRA adapters; the projector and Vision Remember train in full."},
    )
    qlora: bool = field(default=False, metadata={"help": "LoRA on a decoder loaded in 4-bit NF4 (bitsandbytes)."})
    lora_rank: int = field(default=16, metadata={"help": "The adapters' rank r."})
    lora_alpha: int | None = field(default=None, metadata={"help": "The adapters' alpha; default: twice the rank."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapters' input."})
    merge: bool = field(
        default=False, metadata={"help": "After LoRA, also save the merged model to OUTPUT_DIR/merged."}
    )

    def __post_init__(self):
        if self.merge and self.qlora:
            raise ValueError(
                "--merge folds adapters into the weights they trained on, 4-bit here: merge a QLoRA adapter into the "
                "full-precision model with vr_hf.lora.merge_adapter_checkpoint."
            )
        if self.merge and not self.lora:
            raise ValueError("--merge merges LoRA adapters: add --lora.")
        self.lora = self.lora or self.qlora


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in `--help`, as `HfArgumentParser` shows them, and the recipe's examples as written."""


def recipe_parser(description: str, epilog: str, lora: bool = False, **defaults) -> TrlParser:
    """`TrlParser` over `RecipeArguments`, `LoraArguments` (with `lora`) and `SFTConfig`, with `RECIPE_DEFAULTS` and
    the recipe's own `defaults` (e.g. `learning_rate`, `global_batch_size`)."""
    dataclasses = (RecipeArguments, LoraArguments, SFTConfig) if lora else (RecipeArguments, SFTConfig)
    parser = TrlParser(dataclasses, description=description, epilog=epilog, formatter_class=HelpFormatter)
    parser.set_defaults(**RECIPE_DEFAULTS, **defaults)
    return parser


def parse_recipe_args(parser: TrlParser, argv=None) -> tuple:
    """Parse a recipe's command line (and `--config FILE`), check it, and set the accumulation for the global batch.

    Every mistake found here is reported, as a command-line error, before any data or weights load.
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        with warnings.catch_warnings():
            if not any("gradient_checkpointing" in argument for argument in argv):
                # TRL's SFTConfig sets Transformers' deprecated name itself: the warning is not for the user
                warnings.filterwarnings("ignore", "`gradient_checkpointing` is deprecated", FutureWarning)
            return check_recipe_args(*parser.parse_args_and_config(argv))
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))


def check_recipe_args(*parsed) -> tuple:
    *parsed, training_args = parsed
    recipe = parsed[0]
    if recipe.model is not None:
        resolve_source(recipe.model, "--model", hub_needs_owner=True)
    if recipe.global_batch_size:
        if training_args.gradient_accumulation_steps != 1:
            raise ValueError(
                f"--gradient_accumulation_steps {training_args.gradient_accumulation_steps} and --global_batch_size "
                f"{recipe.global_batch_size} both set the batch: give one (--global_batch_size 0 keeps the "
                "accumulation as given)."
            )
        training_args.gradient_accumulation_steps = gradient_accumulation_steps(
            recipe.global_batch_size, training_args.per_device_train_batch_size, training_args.world_size
        )
    if training_args.eval_strategy != "no" and recipe.eval_data is None and is_llava_json(recipe.data):
        raise ValueError(
            f"--eval_strategy {training_args.eval_strategy.value} needs evaluation data, and a LLaVA JSON file has no "
            "splits: give --eval_data."
        )
    if training_args.resume_from_checkpoint == "latest" and not last_checkpoint(training_args.output_dir):
        raise ValueError(
            f"--resume_from_checkpoint latest: there is no checkpoint in {training_args.output_dir} to resume from."
        )
    if len(parsed) > 1 and parsed[1].qlora:
        if recipe.tiny:
            raise ValueError("--qlora quantizes a checkpoint as it loads: give it with --model.")
        if not (training_args.bf16 or training_args.fp16):
            raise ValueError(
                "--qlora trains in mixed precision (TRL keeps QLoRA's adapters in bf16): add --bf16 true (with "
                "--use_cpu on a machine without a GPU) or --fp16 true."
            )
    check_engine(training_args)
    return (*parsed, training_args)


def last_checkpoint(output_dir) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None


def check_engine(training_args) -> None:
    """Refuse a launch that accelerate cannot run as asked on this machine, rather than train some other way.

    Without a GPU, accelerate 1.x connects the processes of a plain launch only with `--use_cpu` (DDP over gloo),
    drops DeepSpeed under `--use_cpu`, and runs FSDP on GPUs only: each of these would silently train otherwise.
    """
    launched = int(os.environ.get("WORLD_SIZE", 1))  # set by `accelerate launch` and `torchrun`
    state = training_args.distributed_state
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and state.device.type == "cpu":
        raise RuntimeError("accelerate runs FSDP on GPUs only: on this machine it would train with DDP instead.")
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed and state.distributed_type != DistributedType.DEEPSPEED:
        raise RuntimeError("accelerate dropped DeepSpeed for this run (it does under --use_cpu): launch without it.")
    if launched > 1 and state.num_processes != launched:
        raise RuntimeError(
            f"accelerate started {launched} processes but connected {state.num_processes}: each would train alone. "
            "Without a GPU, add --use_cpu (DDP over gloo)."
        )


def gradient_accumulation_steps(global_batch_size: int, per_device_batch_size: int, world_size: int) -> int:
    """The accumulation that makes `per_device_batch_size` on every process add up to `global_batch_size`."""
    per_step = per_device_batch_size * world_size
    if global_batch_size % per_step:
        raise ValueError(
            f"A global batch of {global_batch_size} is not a whole number of steps of {per_device_batch_size} samples "
            f"on each of {world_size} processes: change --global_batch_size or --per_device_train_batch_size."
        )
    return global_batch_size // per_step


def batch_summary(config) -> str:
    """How a Trainer config's global batch is made: processes x per-device batch x accumulation steps."""
    total = config.world_size * config.per_device_train_batch_size * config.gradient_accumulation_steps
    return (
        f"global batch {total} = {config.world_size} process(es) x {config.per_device_train_batch_size} per device "
        f"x {config.gradient_accumulation_steps} accumulation step(s)"
    )


def groups_summary(groups: list[dict]) -> str:
    """The parts `trainable_parameter_groups` returned: name, size and learning rate of each."""
    return ", ".join(f"{g['name']} ({sum(p.numel() for p in g['params']):,} at {g['lr']:g})" for g in groups)


def is_llava_json(source) -> bool:
    return Path(os.fspath(source)).suffix in (".json", ".jsonl")


def load_training_data(source, image_folder=None, split: str = "train", on_error: str = "skip"):
    """A dataset in TRL's vision format (`images`, `messages`) from LLaVA-style JSON, a saved dataset or the Hub.

    Args:
        source: A LLaVA `.json`/`.jsonl` file (converted by `vr_hf.data.load_llava_json`, bad rows reported and
            skipped), a folder written by `Dataset.save_to_disk`, or a name for `datasets.load_dataset`.
        image_folder: Folder the LLaVA rows' image paths are relative to (default: the JSON file's folder).
        split: The split to load from a saved `DatasetDict` or the Hub.
        on_error: For LLaVA JSON: `"skip"` bad rows (printing the report) or `"raise"` on the first one.
    """
    import datasets

    from .data import load_llava_json

    path = Path(os.fspath(source))
    if is_llava_json(path):
        dataset, report = load_llava_json(path, image_folder, on_error=on_error)
        print(report)
        return dataset
    if path.is_dir():
        dataset = datasets.load_from_disk(str(path))
        return dataset[split] if isinstance(dataset, datasets.DatasetDict) else dataset
    return datasets.load_dataset(str(source), split=split)


def load_model_and_processor(name_or_path, **from_pretrained_kwargs):
    """A vr-hf checkpoint and its processor, with the installed vr-hf's classes (a checkpoint's own remote code is for
    users without vr-hf); the processor first, so that a checkpoint without one is refused before the weights load."""
    from transformers import AutoModelForImageTextToText

    from .processor import load_processor

    processor = load_processor(name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, **from_pretrained_kwargs)
    return model, processor


def tiny_model_and_processor(seed: int = 0):
    """A tiny random model (`vr_hf.tiny`) and its byte-level processor: a recipe runs on a CPU in seconds."""
    from transformers import AutoModelForImageTextToText

    from .processor import build_processor
    from .tiny import byte_tokenizer, tiny_config

    torch.manual_seed(seed)
    config = tiny_config()
    model = AutoModelForImageTextToText.from_config(config)  # partitioned as it is built under DeepSpeed ZeRO-3
    return model, build_processor(config, byte_tokenizer())


def recipe_data(recipe: RecipeArguments, training_args):
    """The training dataset and, when `--eval_strategy` asks for one, the evaluation dataset."""
    train = load_training_data(recipe.data, recipe.image_folder, recipe.train_split)
    if training_args.eval_strategy == "no":
        return train, None
    return train, load_training_data(recipe.eval_data or recipe.data, recipe.image_folder, recipe.eval_split)


def recipe_model(recipe: RecipeArguments, seed: int, **from_pretrained_kwargs):
    """The model and processor a recipe's `--model` (or `--tiny`) names."""
    if recipe.tiny:
        return tiny_model_and_processor(seed)
    return load_model_and_processor(recipe.model, **from_pretrained_kwargs)


class RecipeTrainer(SFTTrainer):
    """`SFTTrainer` whose model card (at every checkpoint, at the end, on the Hub) describes what the recipe trained:
    the base model, the data, the parts, and how to load the remote-code checkpoint.

    Args:
        recipe: The recipe's own arguments (the base model and the data).
        summary: One line on what trained (the phase and its parts, or the adapters).
        adapter: Whether the output folder holds a PEFT adapter rather than the whole model.
    """

    def __init__(self, *args, recipe: RecipeArguments, summary: str, adapter: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.recipe, self.summary, self.adapter = recipe, summary, adapter

    def end(self):
        """`Trainer.end`. A run on several CPU processes then exits at once: torch's gloo process group, torn down at
        interpreter exit, deadlocks where its worker thread waits for the interpreter lock that the exiting thread
        holds while it joins that worker, which hangs a run that has finished."""
        super().end()
        if self.args.world_size > 1 and self.args.device.type == "cpu":
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None):
        if not self.is_world_process_zero():
            return
        name = model_name or Path(self.args.output_dir).name
        card = recipe_model_card(self, name, self.hub_model_id or self.args.output_dir, adapter=self.adapter)
        card.save(os.path.join(self.args.output_dir, "README.md"))


def hub_id(name) -> str | None:
    """`name` if it can only be a Hub id (no such local path), else None: model card metadata names Hub repos only."""
    return None if name is None or os.path.exists(name) else str(name)


def recipe_model_card(trainer: RecipeTrainer, name: str, model_id: str, adapter: bool) -> ModelCard:
    """The model card of a recipe's output: `model_id` is where the usage snippet loads it from."""
    import peft
    import transformers
    import trl

    recipe, args = trainer.recipe, trainer.args
    model = trainer.model.get_base_model() if isinstance(trainer.model, peft.PeftModel) else trainer.model
    base = "a tiny random LLaVA-VR (`vr_hf.tiny`)" if recipe.tiny else f"`{recipe.model}`"
    data = f"`{recipe.data}` ({len(trainer.train_dataset):,} samples)"
    if trainer.eval_dataset is not None:
        data += f", evaluated on `{recipe.eval_data or recipe.data}` ({len(trainer.eval_dataset):,} samples)"
    metadata = ModelCardData(
        base_model=None if recipe.tiny else hub_id(recipe.model),
        datasets=[hub_id(recipe.data)] if hub_id(recipe.data) else None,
        library_name="peft" if adapter else "transformers",
        pipeline_tag="image-text-to-text",
        tags=[
            "vision-remember",
            getattr(model.config, "backbone_model_type", None) or "llava-vr",
            "custom_code",
            "trl",
        ],
    )
    if adapter:
        base_id = recipe.model or "path/to/the/base/model"
        load = f"""from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{base_id}", trust_remote_code=True)
model = PeftModel.from_pretrained(model, "{model_id}").merge_and_unload()
processor = AutoProcessor.from_pretrained("{base_id}", trust_remote_code=True)"""
    else:
        load = f"""from transformers import pipeline

pipe = pipeline("image-text-to-text", model="{model_id}", trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image", "url": "photo.jpg"}}, {{"type": "text", "text": "Describe the image."}}]}}]
print(pipe(text=messages, max_new_tokens=64, return_full_text=False)[0]["generated_text"])"""  # noqa: E501
    schedule = f"{args.num_train_epochs:g} epoch(s)" if args.max_steps <= 0 else f"{args.max_steps} steps"
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    loss = "the assistant's answers only" if args.assistant_only_loss else "every token"
    adapter_note = "\nThis folder holds the LoRA adapter: load it onto the base model.\n" if adapter else ""
    versions = f"Transformers {transformers.__version__}, TRL {trl.__version__}, PEFT {peft.__version__}"
    text = f"""---
{metadata.to_yaml()}
---

# {name}

`{type(model).__name__}` (Vision Remember, remote code) trained from {base} on {data} with TRL's `SFTTrainer`.
{adapter_note}
## Use

```python
{load}
```

## Training

- {trainer.summary}
- {batch_summary(args)}; {schedule}, `{args.lr_scheduler_type.value}` schedule, warmup {args.warmup_steps:g}.
- Loss on {loss}; precision {precision}; activation checkpointing {args.activation_checkpointing}.
- {versions}, PyTorch {torch.__version__}.
"""
    return ModelCard(text)


def train_and_save(trainer: RecipeTrainer, training_args) -> None:
    """Train (resuming where asked), save model, processor and model card, and push to the Hub where asked."""
    if trainer.is_world_process_zero():
        print(trainer.summary)
        print(batch_summary(trainer.args))
    resume = training_args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume == "latest" else resume)
    trainer.save_model(training_args.output_dir)
    trainer.create_model_card(model_name=Path(training_args.output_dir).name)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=hub_id(trainer.recipe.data))


__all__ = [
    "LoraArguments",
    "RECIPE_DEFAULTS",
    "RecipeArguments",
    "RecipeTrainer",
    "batch_summary",
    "gradient_accumulation_steps",
    "groups_summary",
    "load_model_and_processor",
    "load_training_data",
    "parse_recipe_args",
    "recipe_data",
    "recipe_model",
    "recipe_model_card",
    "recipe_parser",
    "tiny_model_and_processor",
    "train_and_save",
]
