"""Watch one model of the tables learn: its held-out loss and first-answer-token accuracy as training goes.

It tells a model that has not learned yet from one that cannot: a model that ignores the image sits at the answer
prior, its loss at the answers' entropy, and every model trained with the same seed sits on the same curve there.

    python -m vr_hf.demo.learning_curve OUTPUT_DIR/runs/tower/pretrained --ratio 1/9 --warm-start-steps 400
"""

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from ..cli import downsample_factor
from . import compare, experiment, tables
from .settings import Settings
from .tasks import FAMILIES, make_split


class HeldOutProbe(TrainerCallback):
    """Every `every` steps, the model's held-out answer loss and how often its first answer token is right."""

    def __init__(self, batch: dict, every: int):
        self.batch, self.every, self.points = batch, every, []
        supervised = batch["labels"] != -100
        self.first = supervised.float().argmax(dim=1)  # each sample's first answer token
        self.rows = torch.arange(len(self.first))

    def measure(self, model, step: int):
        model.eval()
        with torch.no_grad():
            output = model(**self.batch)
        model.train()
        predicted = output.logits[self.rows, self.first - 1].argmax(-1)
        accuracy = (predicted == self.batch["input_ids"][self.rows, self.first]).float().mean()
        self.points.append({"step": step, "loss": float(output.loss), "first_token_accuracy": float(accuracy)})
        tqdm.write(f"step {step:5d}: held-out loss {output.loss:.3f}, first answer token right {accuracy:.1%}")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self.measure(model, state.global_step)


def learning_curve(
    tower_dir: str,
    model: tables.Model,
    warm_start_steps: int = 0,
    steps: int = 1000,
    learning_rate: float = 1e-3,
    every: int = 50,
    task: str = "word",
    seed: int = 0,
    scratch: str = "outputs/learning-curve",
    train_size: int = 4000,
    test_size: int = 200,
    save_to: str | None = None,
) -> list[dict]:
    """Train `model` as the tables do (from the warm-start chain of `warm_start_steps` per stage, kept in `scratch`
    for the next call; a `vr-hf` output folder with the same settings lends its own) and measure it every `every`
    steps on the held-out questions; save it with its processor to `save_to` where given (`layer_probe` reads such
    checkpoints)."""
    settings = Settings(
        task=task, steps=steps, train_size=train_size, warm_start_steps=warm_start_steps, output_dir=scratch
    )
    if warm_start_steps:
        compare.train_warm_starts(seed, compare.warm_start_chain(model.downsample_factor), settings, tower_dir)
    built, processor = compare.start_model(model, seed, settings, tower_dir, Path(scratch))
    pad = processor.tokenizer.pad_token_id
    held_out = experiment.AnswerDataset(make_split(test_size, compare.TEST_SEED, task), processor)
    probe = HeldOutProbe(experiment.collate(pad)(held_out.items), every)
    probe.measure(built.train(), 0)
    settings = replace(settings, learning_rate=learning_rate)
    compare.train_started(built, processor, seed, steps, settings, Path(scratch), [probe])
    if save_to:
        built.save_pretrained(save_to)
        processor.save_pretrained(save_to)
    return probe.points


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m vr_hf.demo.learning_curve", description=__doc__.split("\n")[0])
    parser.add_argument("tower_dir", help="a pretrained tower, e.g. OUTPUT_DIR/runs/tower/pretrained of a vr-hf run")
    parser.add_argument("--ratio", type=downsample_factor, default=2, help="compression ratio (default 1/4)")
    parser.add_argument(
        "--variant", choices=tables.VARIANTS, default="baseline", help="a model of the tables (default %(default)s)"
    )
    parser.add_argument(
        "--warm-start-steps", type=int, default=0, help="per stage of the tables' warm-start chain (default 0)"
    )
    parser.add_argument("--steps", type=int, default=1000, help="default %(default)s")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="after the warm start (default %(default)s)")
    parser.add_argument("--task", choices=FAMILIES, default="word", help="default %(default)s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--scratch",
        default="outputs/learning-curve",
        help="where the warm-start chain is kept: a vr-hf --output-dir trained with the same settings lends its own "
        "(default %(default)s)",
    )
    parser.add_argument("--output", help="write the curve here as JSON")
    parser.add_argument("--save", help="save the trained model and its processor in this folder")
    arguments = parser.parse_args(argv)
    curve = learning_curve(
        arguments.tower_dir,
        tables.Model(arguments.ratio, arguments.variant),
        arguments.warm_start_steps,
        arguments.steps,
        arguments.learning_rate,
        task=arguments.task,
        seed=arguments.seed,
        scratch=arguments.scratch,
        save_to=arguments.save,
    )
    if arguments.output:
        with open(arguments.output, "w") as file:
            json.dump({"settings": vars(arguments), "curve": curve}, file, indent=1)


if __name__ == "__main__":
    main()
