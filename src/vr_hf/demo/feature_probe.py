"""How much of each answer the pooled vision features still hold, ratio by ratio: an attention probe.

One learned query attends over an image's tokens (the tower's features, average-pooled over `s x s` windows as the
baseline's projector pools them) and a linear layer names the answer. What the probe reaches on held-out images is a
lower bound on what a pooled model could reach from those features, whatever its decoder learns: it tells what
pooling destroys apart from what a model fails to learn.

    python -m vr_hf.demo.feature_probe OUTPUT_DIR/runs/tower/pretrained [--task word]
"""

import argparse

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import SiglipVisionModel

from ..modeling.projectors import from_grid, to_grid
from .compare import TEST_SEED
from .tasks import FAMILIES, make_split
from .tower import pixel_values


RATIOS = (1, 2, 3, 4)  # window sides s: ratios 1/1, 1/4, 1/9, 1/16


def pooled_features(tower: SiglipVisionModel, samples, side: int) -> torch.Tensor:
    """`(images, tokens, channels)`: the tower's last hidden layer, as the projector reads it, pooled `side x side`."""
    with torch.no_grad():
        states = tower(pixel_values(samples), output_hidden_states=True).hidden_states[-1]
    return from_grid(F.avg_pool2d(to_grid(states), side))


def attention_probe(
    train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor, steps: int = 1500
) -> float:
    """Held-out accuracy of one learned query over the tokens plus a linear readout, trained with Adam."""
    torch.manual_seed(0)
    query = torch.zeros(train.shape[-1], requires_grad=True)
    readout = torch.nn.Linear(train.shape[-1], int(train_labels.max()) + 1)
    optimizer = torch.optim.Adam([query, *readout.parameters()], lr=5e-3)

    def logits(tokens):
        weights = (tokens @ query).softmax(-1)
        return readout((weights[..., None] * tokens).sum(1))

    for _ in range(steps):
        batch = torch.randint(len(train), (128,))
        loss = F.cross_entropy(logits(train[batch]), train_labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float((logits(test).argmax(-1) == test_labels).float().mean())


def probe_table(tower_dir: str, task: str = "word", train_size: int = 3000) -> dict[str, dict[int, float]]:
    """Probe accuracy per question type and window side, on the tables' held-out images."""
    tower = SiglipVisionModel.from_pretrained(tower_dir).eval()
    train, test = make_split(train_size, 0, task), make_split(400, TEST_SEED, task)
    results = {}
    for question_type in FAMILIES[task].questions:
        train_part = [sample for sample in train if sample.task == question_type]
        test_part = [sample for sample in test if sample.task == question_type]
        answers = sorted({sample.answer for sample in train_part + test_part})
        labels = [torch.tensor([answers.index(sample.answer) for sample in part]) for part in (train_part, test_part)]
        results[question_type] = {}
        for side in tqdm(RATIOS, desc=f"probing {question_type!r}"):
            features = [pooled_features(tower, part, side) for part in (train_part, test_part)]
            results[question_type][side] = attention_probe(features[0], labels[0], features[1], labels[1])
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m vr_hf.demo.feature_probe", description=__doc__.split("\n")[0])
    parser.add_argument("tower_dir", help="a pretrained tower, e.g. OUTPUT_DIR/runs/tower/pretrained of a vr-hf run")
    parser.add_argument("--task", choices=FAMILIES, default="word")
    arguments = parser.parse_args(argv)
    results = probe_table(arguments.tower_dir, arguments.task)
    print("| question type | " + " | ".join(f"1/{side * side}" for side in RATIOS) + " |")
    print("|---|" + "---|" * len(RATIOS))
    for question_type, by_side in results.items():
        print(f"| {question_type} | " + " | ".join(f"{100 * by_side[side]:.1f}" for side in RATIOS) + " |")


if __name__ == "__main__":
    main()
