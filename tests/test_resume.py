"""Recipes: a run interrupted at a checkpoint and resumed logs the same losses as an uninterrupted run."""

import importlib.util
import json
from pathlib import Path

import pytest
from transformers import TrainerCallback

from vr_hf.recipes import train_and_save

from conftest import random_image


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def write_rows(folder: Path, count: int = 8, text_only: frozenset[int] = frozenset()) -> Path:
    """A tiny LLaVA-style JSON with `count` rows, each with an image of one of a few sizes but those in `text_only`;
    returns the JSON's path (images beside it)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        if index in text_only:
            conversation = [
                {"from": "human", "value": f"What comes after {index}?"},
                {"from": "gpt", "value": f"{index + 1}."},
            ]
            rows.append({"id": str(index), "conversations": conversation})
            continue
        random_image(30 + 10 * (index % 3), 60 - 20 * (index % 2), seed=index).save(folder / f"{index}.png")
        conversation = [
            {"from": "human", "value": f"<image>\nWhat is picture {index}?"},
            {"from": "gpt", "value": f"Noise number {index}."},
        ]
        rows.append({"id": str(index), "image": f"{index}.png", "conversations": conversation})
    path = folder / "rows.json"
    path.write_text(json.dumps(rows))
    return path


def recipe_argv(data: Path, output_dir: Path, *extra: str) -> list[str]:
    """A tiny fp32 run of a recipe: batch 2 on one process, a step logged and saved every 2 steps."""
    return [
        "--tiny",
        "--data",
        str(data),
        "--image_folder",
        str(data.parent),
        "--output_dir",
        str(output_dir),
        "--global_batch_size",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--bf16",
        "false",
        "--logging_steps",
        "1",
        "--save_steps",
        "2",
        *extra,
    ]


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class StopAfter(TrainerCallback):
    """Ends training after `step`, as a crash after that step's checkpoint would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def losses(trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


@pytest.mark.parametrize("recipe", ["train_alignment", "train_instruction"])
def test_resume_reproduces_uninterrupted_losses(tmp_path, recipe):
    module = load_recipe(recipe)
    data = write_rows(tmp_path / "data")
    # A learning rate large enough that the updates, and so any difference after resuming, show in the losses
    argv = ["--max_steps", "4", "--learning_rate", "1e-2", "--warmup_steps", "1"]

    uninterrupted = module.build_trainer(*module.parse_args(recipe_argv(data, tmp_path / "full", *argv)))
    uninterrupted.train()

    interrupted_args = module.parse_args(recipe_argv(data, tmp_path / "resumed", *argv))
    interrupted = module.build_trainer(*interrupted_args)
    interrupted.add_callback(StopAfter(2))
    interrupted.train()
    assert interrupted.state.global_step == 2
    assert (tmp_path / "resumed" / "checkpoint-2" / "optimizer.pt").is_file()

    # A fresh model and trainer, as in a new process, resuming from the latest checkpoint in the output folder
    resumed_args = module.parse_args(
        recipe_argv(data, tmp_path / "resumed", *argv, "--resume_from_checkpoint", "latest")
    )
    resumed = module.build_trainer(*resumed_args)
    train_and_save(resumed, resumed_args[-1])

    expected = losses(uninterrupted)
    assert sorted(expected) == [1, 2, 3, 4]
    assert len(set(expected.values())) == 4, "the losses should move, or equal losses would prove nothing"
    assert losses(interrupted) == {step: expected[step] for step in (1, 2)}
    assert losses(resumed) == expected  # steps 1-2 from the checkpoint's history, 3-4 trained after resuming
