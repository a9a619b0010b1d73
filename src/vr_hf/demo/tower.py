"""A tiny SigLIP vision tower, pretrained on patch-level classification of the synthetic task and then frozen.

As in the paper, the vision tower comes pretrained: every patch's features already say which item it holds and
whether it is red, so what the language model learns is only how to find and read them. (A tower trained from
scratch together with the decoder can pack detail into the pooled tokens itself and hide what pooling loses.)
"""

import numpy as np
import torch
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel, Trainer, TrainingArguments

from .tasks import CELL, EMPTY, GRID, IMAGE_SIZE, Sample


def tower_config() -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=CELL,
        vision_use_head=False,
    )


def pixel_values(samples: list[Sample]) -> torch.Tensor:
    """Normalised as the model's image processor does it (mean 0.5, std 0.5): `(N, 3, H, W)`."""
    images = torch.from_numpy(np.stack([sample.image for sample in samples]))
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class PatchClassifier(nn.Module):
    """The tower plus linear heads on its last hidden state: which item each patch holds, whether it is red, and,
    where `learn_columns`, which column of the grid it is in (as a real tower's features carry where they are)."""

    def __init__(self, config: SiglipVisionConfig, learn_columns: bool = False):
        super().__init__()
        self.tower = SiglipVisionModel(config)
        self.item_head = nn.Linear(config.hidden_size, EMPTY + 1)
        self.red_head = nn.Linear(config.hidden_size, 2)
        self.column_head = nn.Linear(config.hidden_size, GRID) if learn_columns else None

    def forward(self, pixel_values, item_labels, red_labels):
        states = self.tower(pixel_values).last_hidden_state
        loss = nn.functional.cross_entropy(self.item_head(states).flatten(0, 1), item_labels.flatten())
        loss = loss + nn.functional.cross_entropy(self.red_head(states).flatten(0, 1), red_labels.flatten())
        if self.column_head is not None:
            columns = torch.arange(GRID, device=states.device).repeat(GRID).expand(len(states), -1)
            loss = loss + nn.functional.cross_entropy(self.column_head(states).flatten(0, 1), columns.flatten())
        return {"loss": loss}


class PatchDataset(torch.utils.data.Dataset):
    def __init__(self, samples: list[Sample]):
        self.pixel_values = pixel_values(samples)
        self.item_labels = torch.tensor([sample.cell_items.reshape(GRID * GRID) for sample in samples])
        self.red_labels = torch.tensor([sample.cell_red.reshape(GRID * GRID) for sample in samples]).long()

    def __len__(self):
        return len(self.pixel_values)

    def __getitem__(self, index):
        return {
            "pixel_values": self.pixel_values[index],
            "item_labels": self.item_labels[index],
            "red_labels": self.red_labels[index],
        }


def pretrain_tower(
    train: list[Sample], test: list[Sample], steps: int, output_dir: str, learn_columns: bool = False, seed: int = 0
) -> tuple[SiglipVisionModel, float]:
    """Train the tower on patch classification for `steps` steps; return it frozen, with its held-out item accuracy."""
    torch.manual_seed(seed)
    classifier = PatchClassifier(tower_config(), learn_columns)
    arguments = TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=32,
        learning_rate=2e-3,
        lr_scheduler_type="cosine",
        warmup_steps=steps // 10,
        logging_steps=max(steps // 5, 1),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
        dataloader_num_workers=0,
    )
    Trainer(model=classifier, args=arguments, train_dataset=PatchDataset(train)).train()
    classifier.eval()
    with torch.no_grad():
        held_out = PatchDataset(test)
        states = classifier.tower(held_out.pixel_values).last_hidden_state
        accuracy = float((classifier.item_head(states).argmax(-1) == held_out.item_labels).float().mean())
    return classifier.tower.requires_grad_(False), accuracy
