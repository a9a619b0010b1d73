"""Watch one model of the tables learn: its held-out loss and first-answer-token accuracy as training goes.

It tells a model that has not learned yet from one that cannot: a model that ignores the image sits at the answer
prior, its loss at the answers' entropy, and every model trained with the same seed sits on the same curve there.

    python -m vr_hf.demo.learning_curve OUTPUT_DIR/runs/tower/pretrained --ratio 1/4 [--warm-start-steps 400]
"""

import argparse
import json

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from ..cli import downsample_factor
from ..modeling.configuration_llava_vr import PROJECTOR_TYPES
from . import experiment
from .compare import TEST_SEED, load_warm_start
from .decoders import build_model
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
    side: int,
    vision_remember: dict | None,
    projector_type: str = "avg_pool",
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
    """Train the model (from the uncompressed model's `warm_start_steps`, as the tables do) and measure it every
    `every` steps on the held-out questions; save it with its processor to `save_to` where given (`layer_probe`
    reads such checkpoints)."""
    train_split = make_split(train_size, seed, task)
    model, processor = build_model("tiny", tower_dir, side, vision_remember, seed, scratch, projector_type)
    pad = processor.tokenizer.pad_token_id
    if warm_start_steps:
        uncompressed, uncompressed_processor = build_model("tiny", tower_dir, 1, None, seed, scratch)
        warm_up = experiment.AnswerDataset(train_split, uncompressed_processor)
        experiment.train(uncompressed, warm_up, experiment.RunSettings(warm_start_steps, 32, 1e-3, seed), scratch, pad)
        load_warm_start(model, uncompressed.state_dict())
    held_out = experiment.AnswerDataset(make_split(test_size, TEST_SEED, task), processor)
    probe = HeldOutProbe(experiment.collate(pad)(held_out.items), every)
    probe.measure(model.train(), 0)
    run = experiment.RunSettings(steps, 32, learning_rate, seed)
    experiment.train(model, experiment.AnswerDataset(train_split, processor), run, scratch, pad, [probe])
    if save_to:
        model.save_pretrained(save_to)
        processor.save_pretrained(save_to)
    return probe.points


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m vr_hf.demo.learning_curve", description=__doc__.split("\n")[0])
    parser.add_argument("tower_dir", help="a pretrained tower, e.g. OUTPUT_DIR/runs/tower/pretrained of a vr-hf run")
    parser.add_argument("--ratio", type=downsample_factor, default=2, help="compression ratio (default 1/4)")
    parser.add_argument("--vision-remember", action="store_true", help="with Vision Remember (default: without)")
    parser.add_argument("--projector", choices=PROJECTOR_TYPES, default="avg_pool", help="default %(default)s")
    parser.add_argument("--warm-start-steps", type=int, default=0, help="as the tables' option (default 0)")
    parser.add_argument("--steps", type=int, default=1000, help="default %(default)s")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="after the warm start (default %(default)s)")
    parser.add_argument("--task", choices=FAMILIES, default="word", help="default %(default)s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="write the curve here as JSON")
    parser.add_argument("--save", help="save the trained model and its processor in this folder")
    arguments = parser.parse_args(argv)
    vision_remember = {} if arguments.vision_remember else None
    curve = learning_curve(
        arguments.tower_dir,
        arguments.ratio,
        vision_remember,
        arguments.projector,
        arguments.warm_start_steps,
        arguments.steps,
        arguments.learning_rate,
        task=arguments.task,
        seed=arguments.seed,
        save_to=arguments.save,
    )
    if arguments.output:
        with open(arguments.output, "w") as file:
            json.dump({"settings": vars(arguments), "curve": curve}, file, indent=1)


if __name__ == "__main__":
    main()
