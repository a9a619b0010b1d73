"""Figure 1b in miniature: where a checkpoint's vision tokens lose the detail, where it fades and where it comes back.

The attention probe of `feature_probe` (one learned query, a linear readout) reads each question type's answer from
the vision tokens at every stage of a vr-hf checkpoint (LLaVA-VR or a graft): the uncompressed features Vision
Remember reads (where the checkpoint has it), the tokens entering the decoder (after the projector's compression),
and the vision tokens' hidden states after each decoder layer, Vision Remember's updates included. Held-out probe
accuracy per stage and checkpoint is printed as a table and drawn as one line per checkpoint.

    python -m vr_hf.demo.layer_probe CHECKPOINT [CHECKPOINT ...] [--task word] [--plot probe.png]
"""

import argparse
import json
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..recipes import load_model_and_processor
from .compare import TEST_SEED
from .experiment import conversation
from .feature_probe import attention_probe
from .tasks import FAMILIES, make_split


def stage_states(model, processor, samples, batch_size: int = 50) -> dict[str, torch.Tensor]:
    """Per stage, every sample's vision tokens (all samples ask the same question): `(samples, tokens, width)`."""
    prompt = processor.apply_chat_template(conversation(samples[0].question), add_generation_prompt=True)
    stages = {}
    for start in range(0, len(samples), batch_size):
        images = [Image.fromarray(sample.image) for sample in samples[start : start + batch_size]]
        inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt", padding=True)
        # encoded here and handed to the forward: a graft's outputs carry the images only from Transformers 5.24 on
        with torch.no_grad():
            images_encoded = model.model.encode_images(**inputs)
            text = {name: value for name, value in inputs.items() if name != "pixel_values"}
            outputs = model(**text, mm_encoder_outputs={"image": images_encoded}, output_hidden_states=True)
        features = images_encoded.remember_features
        placeholders = inputs["input_ids"] == model.config.image_token_id
        layers = outputs.hidden_states[1:]  # the last one after the decoder's final norm, as Transformers returns it
        tokens = {"decoder input": outputs.hidden_states[0]}
        tokens.update({f"after layer {index}": states for index, states in enumerate(layers[:-1])})
        tokens[f"after layer {len(layers) - 1}, normed"] = layers[-1]
        batch = {name: states[placeholders].view(len(images), -1, states.shape[-1]) for name, states in tokens.items()}
        if features is not None:  # the last level of the uncompressed features, as the images' patches
            batch = {"uncompressed features": last_level(features, len(images), model.config), **batch}
        for name, states in batch.items():
            stages.setdefault(name, []).append(states.float())
    return {name: torch.cat(parts) for name, parts in stages.items()}


def last_level(features: tuple[torch.Tensor, ...], images: int, config) -> torch.Tensor:
    """`(images, rows, width)`: each image's rows of the features Vision Remember reads, its last level only. A model
    that slices images (MiniCPM-V) returns one entry per slice, the slices of an image in a row: the probe's images
    are all of one size, so each has as many."""
    width = config.vision_config.hidden_size
    per_image = len(features) // images
    return torch.stack(
        [torch.cat(features[index : index + per_image])[:, -width:] for index in range(0, len(features), per_image)]
    )


def probe_checkpoint(checkpoint: str, task: str = "word", train_size: int = 1000, test_size: int = 400, steps=1500):
    """Held-out probe accuracy per question type and stage."""
    model, processor = load_model_and_processor(checkpoint)
    model.eval()
    train, test = make_split(train_size, 0, task), make_split(test_size, TEST_SEED, task)
    results = {}
    for question_type in FAMILIES[task].questions:
        parts = [[sample for sample in split if sample.task == question_type] for split in (train, test)]
        answers = sorted({sample.answer for sample in parts[0] + parts[1]})
        labels = [torch.tensor([answers.index(sample.answer) for sample in part]) for part in parts]
        states = [stage_states(model, processor, part) for part in parts]
        results[question_type] = {
            stage: attention_probe(states[0][stage], labels[0], states[1][stage], labels[1], steps)
            for stage in tqdm(states[0], desc=f"probing {question_type!r} in {checkpoint}")
        }
    return results


def plot(results: dict[str, dict], path: str):
    """One panel per question type: probe accuracy along the stages, one line per checkpoint (named by its folder)."""
    from matplotlib import pyplot as plt

    question_types = list(next(iter(results.values())))
    by_depth = sorted(results.values(), key=lambda by_type: -len(by_type[question_types[0]]))
    stages = list(dict.fromkeys(stage for by_type in by_depth for stage in by_type[question_types[0]]))
    figure, axes = plt.subplots(1, len(question_types), figsize=(4.5 * len(question_types), 3.6), squeeze=False)
    for axis, question_type in zip(axes[0], question_types):
        for checkpoint, by_type in results.items():
            accuracy = by_type[question_type]
            positions = [stages.index(stage) for stage in accuracy]
            label = Path(checkpoint).name or checkpoint
            axis.plot(positions, [100 * value for value in accuracy.values()], marker="o", label=label)
        axis.set_xticks(range(len(stages)), stages, rotation=20, ha="right", fontsize=7)
        axis.set_title(f"{question_type!r} questions", fontsize=9)
        axis.set_ylabel("held-out probe accuracy (%)")
        axis.set_ylim(0, 105)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m vr_hf.demo.layer_probe", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="vr-hf checkpoints (folders or Hub ids)")
    parser.add_argument("--task", choices=FAMILIES, default="word", help="default %(default)s")
    parser.add_argument("--train-size", type=int, default=1000, help="probe training images (default %(default)s)")
    parser.add_argument("--steps", type=int, default=1500, help="probe training steps (default %(default)s)")
    parser.add_argument("--plot", help="draw the figure here (PNG)")
    parser.add_argument("--output", help="write the accuracies here as JSON")
    arguments = parser.parse_args(argv)
    results = {
        checkpoint: probe_checkpoint(checkpoint, arguments.task, arguments.train_size, steps=arguments.steps)
        for checkpoint in arguments.checkpoints
    }
    for checkpoint, by_type in results.items():
        for question_type, by_stage in by_type.items():
            print(f"\n{checkpoint}, {question_type!r}: held-out probe accuracy (%)")
            print("| " + " | ".join(by_stage) + " |\n|" + "---|" * len(by_stage))
            print("| " + " | ".join(f"{100 * accuracy:.1f}" for accuracy in by_stage.values()) + " |")
    if arguments.plot:
        plot(results, arguments.plot)
    if arguments.output:
        with open(arguments.output, "w") as file:
            json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
