"""Training phases: which parts of a Vision Remember model train, each at its own learning rate.

Parts (attribute paths on `VisionRememberForConditionalGeneration`; on a bare `VisionRememberModel` drop `model.`):

- `vision_tower`: `model.vision_tower`
- `projector`: `model.multi_modal_projector` and `model.image_newline` (the AnyRes row separator, trained with the
  projector as in LLaVA-NeXT)
- `vision_remember`: `model.vision_remember`
- `language_model`: `model.language_model` (decoder layers, embeddings, final norm)
- `lm_head`: `lm_head`

The paper's recipe, as LLaVA's: phase 1 (alignment) trains the projector and the Vision Remember blocks on captions,
phase 2 (instruction tuning) adds the language model (and its head).

A parameter shared by several parts (tied embeddings: `lm_head.weight` is `embed_tokens.weight`) trains when any part
that holds it trains, in the group of the first such part in `PARTS` order.

    groups = trainable_parameter_groups(model, PHASE_1)
    optimizer = torch.optim.AdamW(groups)
    trainer = SFTTrainer(model=model, ..., optimizers=(optimizer, None))
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn as nn


PARTS = ("vision_tower", "projector", "vision_remember", "language_model", "lm_head")
PART_PATHS = {
    "vision_tower": ("model.vision_tower",),
    "projector": ("model.multi_modal_projector", "model.image_newline"),
    "vision_remember": ("model.vision_remember",),
    "language_model": ("model.language_model",),
    "lm_head": ("lm_head",),
}

PHASE_1 = {"projector": 1e-3, "vision_remember": 1e-3}
PHASE_2 = {"projector": 2e-5, "vision_remember": 2e-5, "language_model": 2e-5, "lm_head": 2e-5}
PHASES = {1: PHASE_1, 2: PHASE_2, "alignment": PHASE_1, "instruction": PHASE_2}


def resolve(model: nn.Module, path: str):
    """The module or parameter at `path`, or None where the model has no such part (e.g. no Vision Remember)."""
    if not hasattr(model, "lm_head") and path.startswith("model."):  # a bare VisionRememberModel
        path = path[len("model.") :]
    target = model
    for name in path.split("."):
        target = getattr(target, name, None)
        if target is None:
            return None
    return target


def part_parameters(model: nn.Module, part: str) -> list[nn.Parameter]:
    """The parameters of one part, in module order; a clear error for an unknown or absent part."""
    if part not in PART_PATHS:
        raise ValueError(f"Unknown part {part!r}: choose from {', '.join(PARTS)}.")
    parameters = []
    for path in PART_PATHS[part]:
        target = resolve(model, path)
        if isinstance(target, nn.Parameter):
            parameters.append(target)
        elif isinstance(target, nn.Module):
            parameters.extend(target.parameters())
    if not parameters:
        raise ValueError(
            f"The model has no {part!r} part (looked for {', '.join(PART_PATHS[part])})"
            + (": it was built with use_vision_remember=False." if part == "vision_remember" else ".")
        )
    return parameters


def trainable_parameter_groups(
    model: nn.Module, learning_rates: Mapping[str, float] | int | str, weight_decay: float | None = None
) -> list[dict]:
    """Freeze all of `model`, then unfreeze the parts in `learning_rates` and return their optimizer groups.

    Args:
        model: A `VisionRememberForConditionalGeneration` (or a bare `VisionRememberModel`).
        learning_rates: `{part: learning rate}` over `PARTS`, or a phase (`1`/`"alignment"`, `2`/`"instruction"`).
        weight_decay: Set on every group when given.

    Returns:
        One group per part, `{"name": part, "params": [...], "lr": lr}`, for any `torch.optim` optimizer. A parameter
        shared by two parts appears once.
    """
    if not isinstance(learning_rates, Mapping):
        if learning_rates not in PHASES:
            raise ValueError(f"Unknown phase {learning_rates!r}: choose from {', '.join(map(str, PHASES))}.")
        learning_rates = PHASES[learning_rates]
    unknown = [part for part in learning_rates if part not in PART_PATHS]
    if unknown:
        raise ValueError(f"Unknown part(s) {', '.join(map(repr, unknown))}: choose from {', '.join(PARTS)}.")
    if not learning_rates:
        raise ValueError("No part to train: name at least one of " + ", ".join(PARTS) + ".")

    model.requires_grad_(False)
    seen: set[int] = set()
    groups = []
    for part in sorted(learning_rates, key=PARTS.index):
        params = [p for p in part_parameters(model, part) if id(p) not in seen]
        seen.update(id(p) for p in params)
        for parameter in params:
            parameter.requires_grad_(True)
        if not params:  # everything already claimed by an earlier part (a fully tied part)
            continue
        group = {"name": part, "params": params, "lr": float(learning_rates[part])}
        if weight_decay is not None:
            group["weight_decay"] = weight_decay
        groups.append(group)
    return groups


def trainable_parts(model: nn.Module) -> dict[str, bool]:
    """For each part the model has: whether any of its parameters trains."""
    status = {}
    for part in PARTS:
        try:
            status[part] = any(p.requires_grad for p in part_parameters(model, part))
        except ValueError:
            continue
    return status


__all__ = [
    "PARTS",
    "PHASE_1",
    "PHASE_2",
    "PHASES",
    "part_parameters",
    "trainable_parameter_groups",
    "trainable_parts",
]
